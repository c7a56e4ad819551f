//! A progressive rollout (pure): a plan of shares a service moves to one after another by the
//! safe move, each held while analysis measures the migration every interval, and what each
//! measurement decides.
//!
//! - [`Rollout::new`] validates a plan up front: its shares only grow going up and only shrink
//!   going down (a step that went back would move keys twice), each differs from the one before,
//!   and the last is the target when one is named;
//! - [`Rollout::next`] says what comes next from what has finished (resumable: the finished
//!   shares are recorded, so a command killed mid-plan goes on from there), and
//!   [`Rollout::last_good`] where an abort or a rollback walks back to: the last share that
//!   finished its hold (or where the plan started);
//! - [`Analysis::measure`] judges one measurement of every check: a value inside its bounds
//!   passes, outside fails; **no data is inconclusive** (the hold goes on: a plan never passes on
//!   silence, unlike tools that read NaN as 0); a reading that errors is an error, not a failure,
//!   until `consecutive_error_limit` errors in a row. A critical check's failure rolls back at
//!   once; another's stops the plan where it is once it failed more than `failure_limit` times
//!   in the step. Every verdict names the check, its value and its bound, so an operator (and
//!   the exit message, `/cutover`, the metrics and the log) sees why.
//! - [`hold_over`]: a hold ends when its time is up *and* the last measurement passed.

use std::time::Duration;

/// A plan: from `from`, the shares to move to in turn, each held for `hold`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub from: u8,
    pub shares: Vec<u8>,
    pub hold: Duration,
}

/// What comes next in a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The safe move to this share.
    Move(u8),
    /// Hold at this share (moved to, its hold not finished) while analysis runs.
    Hold(u8),
    /// Every share moved to and held.
    Done,
}

impl Rollout {
    /// A plan from `from` through `shares`, to `to` when named; every problem at once.
    pub fn new(from: u8, to: Option<u8>, shares: &[u8], hold: Duration) -> Result<Rollout, Vec<String>> {
        let mut problems = Vec::new();
        if shares.is_empty() {
            problems.push("the plan names no share".to_string());
        }
        if let Some(&s) = shares.iter().find(|&&s| s > 100) {
            problems.push(format!("{s}% is not a share (0 to 100)"));
        }
        let up = shares.first().is_some_and(|&s| s > from);
        let mut before = from;
        for &s in shares {
            let ok = if up { s > before } else { s < before };
            if !ok {
                let way = if up { "only grow going up" } else { "only shrink going down" };
                problems.push(format!("{before}% → {s}%: shares {way} (from {from}%)"));
            }
            before = s;
        }
        if let (Some(to), Some(&last)) = (to, shares.last())
            && to != last
        {
            problems.push(format!("the plan ends at {last}%, not at --to {to}%"));
        }
        if problems.is_empty() { Ok(Rollout { from, shares: shares.to_vec(), hold }) } else { Err(problems) }
    }

    /// Whether the plan gives keys to the service (up) or takes them back (down).
    pub fn up(&self) -> bool {
        self.shares.first().is_some_and(|&s| s > self.from)
    }

    /// The share the plan ends at.
    pub fn target(&self) -> u8 {
        self.shares.last().copied().unwrap_or(self.from)
    }

    /// What comes next, given the shares whose hold finished (`held`, in plan order) and the
    /// service's share now: a share moved to but not held yet is held; otherwise the next share
    /// not held is moved to.
    pub fn next(&self, held: &[u8], now: u8) -> Next {
        match self.shares.iter().find(|s| !held.contains(s)) {
            None => Next::Done,
            Some(&s) if s == now => Next::Hold(s),
            Some(&s) => Next::Move(s),
        }
    }

    /// Where an abort or a rollback walks back to: the last share whose hold finished, or the
    /// share the plan started from.
    pub fn last_good(&self, held: &[u8]) -> u8 {
        self.shares.iter().rev().find(|s| held.contains(s)).copied().unwrap_or(self.from)
    }
}

/// A plan's shares as one argument (`--plan 10,50,100`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shares(pub Vec<u8>);

impl std::str::FromStr for Shares {
    type Err = String;

    fn from_str(s: &str) -> Result<Shares, String> {
        parse_shares(s).map(Shares)
    }
}

/// Parses `--plan 10,50,100`.
pub fn parse_shares(s: &str) -> Result<Vec<u8>, String> {
    s.split(',')
        .map(|p| p.trim().parse::<u8>().map_err(|_| format!("`{}` in `{s}` is not a share (0 to 100)", p.trim())))
        .collect()
}

/// What a check measures.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: String,
    /// What it reads, for people (`--dry-run`, the report).
    pub about: String,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Failures tolerated in a step before it stops the plan (0: the first one does).
    pub failure_limit: u32,
    /// A failure rolls the plan back at once.
    pub critical: bool,
    /// Errors in a row (a query that did not answer) before they stop the plan.
    pub consecutive_error_limit: u32,
}

impl Check {
    fn new(name: &str, about: &str, min: Option<f64>, max: Option<f64>) -> Check {
        Check {
            name: name.into(),
            about: about.into(),
            min,
            max,
            failure_limit: 2,
            critical: false,
            consecutive_error_limit: 4,
        }
    }

    fn critical(mut self) -> Check {
        (self.critical, self.failure_limit) = (true, 0);
        self
    }

    /// The bounds, as people read them.
    pub fn bounds(&self) -> String {
        match (self.min, self.max) {
            (Some(lo), Some(hi)) => format!("{lo} ≤ x ≤ {hi}"),
            (Some(lo), None) => format!("≥ {lo}"),
            (None, Some(hi)) => format!("≤ {hi}"),
            (None, None) => "any".into(),
        }
    }

    fn passes(&self, v: f64) -> bool {
        self.min.is_none_or(|lo| v >= lo) && self.max.is_none_or(|hi| v <= hi)
    }
}

/// The checks run when configuration names none: new dead letters on the service's topics (a
/// change that could not be applied, either way) and new fence violations are critical, none
/// tolerated; lags and conflicts fail non-critically; the verify score of the buckets the
/// service owns must stay at 100%.
pub fn default_checks() -> Vec<Check> {
    vec![
        Check::new("forward_lag", "messages the service's forward consumer has yet to apply", None, Some(1000.0)),
        Check::new("reverse_lag", "service changes yet to be written back", None, Some(1000.0)),
        Check::new("conflicts", "conflicts recorded since the last measurement", None, Some(10.0)),
        Check::new(
            "fence_violations",
            "writes to fenced keys on the losing side since the last measurement",
            None,
            Some(0.0),
        )
        .critical(),
        Check::new(
            "dead_letters",
            "new dead letters on the service's topics since the last measurement",
            None,
            Some(0.0),
        )
        .critical(),
        Check::new("verify_score", "% of the documents in the buckets the service owns that match", Some(100.0), None),
    ]
}

/// The default checks with the settings of `[cutover.analysis.<check>]` laid over them (the
/// names were validated when the configuration loaded).
pub fn configured(settings: &std::collections::BTreeMap<String, crate::config::CheckSettings>) -> Vec<Check> {
    let mut checks = default_checks();
    for c in &mut checks {
        let Some(s) = settings.get(&c.name) else { continue };
        if s.min.is_some() || s.max.is_some() {
            (c.min, c.max) = (s.min, s.max);
        }
        if let Some(critical) = s.critical {
            c.critical = critical;
            c.failure_limit = if critical { 0 } else { c.failure_limit.max(2) };
        }
        c.failure_limit = s.failure_limit.unwrap_or(c.failure_limit);
        c.consecutive_error_limit = s.consecutive_error_limit.unwrap_or(c.consecutive_error_limit);
    }
    checks
}

/// One reading of a check.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    Value(f64),
    /// Nothing to measure (no traffic, no series): inconclusive, never a pass.
    NoData,
    /// The reading itself failed (a server that did not answer): an error, not a failure.
    Error(String),
}

/// What one reading came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Inconclusive,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Inconclusive => "inconclusive",
            Outcome::Error => "error",
        }
    }
}

/// A check's state through a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Tally {
    pub check: Check,
    pub last: Option<(Reading, Outcome)>,
    pub failures: u32,
    pub errors_in_a_row: u32,
}

/// What a measurement decides.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every check passed.
    Pass,
    /// Some checks had no data or errors below their limit: hold on, measure again.
    Inconclusive { checks: Vec<String> },
    /// A critical check failed: roll back to the last good share.
    RollBack(Why),
    /// A check failed past its limit (or erred too often): stop where the plan is.
    Stop(Why),
}

/// Which check decided, with what.
#[derive(Debug, Clone, PartialEq)]
pub struct Why {
    pub check: String,
    /// The value read (`None`: the reading erred).
    pub value: Option<f64>,
    pub bounds: String,
    pub detail: String,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.value {
            Some(v) => write!(f, "{} = {v} (wanted {}): {}", self.check, self.bounds, self.detail),
            None => write!(f, "{} could not be read: {}", self.check, self.detail),
        }
    }
}

/// The analysis of one step: every check's tally.
#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    pub tallies: Vec<Tally>,
}

impl Analysis {
    pub fn new(checks: Vec<Check>) -> Analysis {
        Analysis {
            tallies: checks
                .into_iter()
                .map(|check| Tally { check, last: None, failures: 0, errors_in_a_row: 0 })
                .collect(),
        }
    }

    /// Judges one measurement (`readings` by check name; a check without one has no data) and
    /// says what it decides. The worst outcome wins: a critical failure, then a failure past
    /// its limit or errors past theirs, then anything inconclusive, else a pass.
    pub fn measure(&mut self, readings: &[(String, Reading)]) -> Verdict {
        let (mut rollback, mut stop, mut unsure) = (None, None, Vec::new());
        for t in &mut self.tallies {
            let reading = readings.iter().find(|(n, _)| *n == t.check.name).map_or(Reading::NoData, |(_, r)| r.clone());
            let outcome = match &reading {
                // NaN (a ratio over nothing) is no data, never a pass and never a failure.
                Reading::Value(v) if v.is_nan() => Outcome::Inconclusive,
                Reading::Value(v) if t.check.passes(*v) => Outcome::Pass,
                Reading::Value(_) => Outcome::Fail,
                Reading::NoData => Outcome::Inconclusive,
                Reading::Error(_) => Outcome::Error,
            };
            t.errors_in_a_row = if outcome == Outcome::Error { t.errors_in_a_row + 1 } else { 0 };
            let why = |detail: String| Why {
                check: t.check.name.clone(),
                value: match &reading {
                    Reading::Value(v) => Some(*v),
                    _ => None,
                },
                bounds: t.check.bounds(),
                detail,
            };
            match outcome {
                Outcome::Fail => {
                    t.failures += 1;
                    if t.check.critical {
                        rollback = rollback.or(Some(why(format!("critical: {}", t.check.about))));
                    } else if t.failures > t.check.failure_limit {
                        let d = format!("failed {} times in this step (limit {})", t.failures, t.check.failure_limit);
                        stop = stop.or(Some(why(d)));
                    } else {
                        unsure.push(t.check.name.clone());
                    }
                }
                Outcome::Error if t.errors_in_a_row >= t.check.consecutive_error_limit => {
                    let e = match &reading {
                        Reading::Error(e) => e.clone(),
                        _ => String::new(),
                    };
                    stop = stop.or(Some(why(format!("{} errors in a row, the last: {e}", t.errors_in_a_row))));
                }
                Outcome::Error | Outcome::Inconclusive => unsure.push(t.check.name.clone()),
                Outcome::Pass => {}
            }
            t.last = Some((reading, outcome));
        }
        match (rollback, stop) {
            (Some(why), _) => Verdict::RollBack(why),
            (None, Some(why)) => Verdict::Stop(why),
            (None, None) if unsure.is_empty() => Verdict::Pass,
            (None, None) => Verdict::Inconclusive { checks: unsure },
        }
    }
}

/// What one measurement says on its own (`ficus analyze --once`): a fail if any check is out of
/// its bounds, else inconclusive if any had no data or erred, else a pass. Limits and
/// criticality are a plan's business; a single measurement has none to spend.
pub fn one_shot(tallies: &[Tally]) -> Outcome {
    let outcomes = || tallies.iter().map(|t| t.last.as_ref().map_or(Outcome::Inconclusive, |(_, o)| *o));
    if outcomes().any(|o| o == Outcome::Fail) {
        Outcome::Fail
    } else if outcomes().any(|o| o != Outcome::Pass) {
        Outcome::Inconclusive
    } else {
        Outcome::Pass
    }
}

/// Whether a hold is over: its time is up and the last measurement passed (a hold never ends on
/// silence or on a failure still within its limit).
pub fn hold_over(elapsed: Duration, hold: Duration, last: Option<&Verdict>) -> bool {
    elapsed >= hold && last == Some(&Verdict::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN5: Duration = Duration::from_secs(300);

    #[test]
    fn one_measurement_fails_on_any_failure_and_is_inconclusive_on_silence_or_errors() {
        let mut a = Analysis::new(default_checks());
        let all = |lag: Reading, dl: Reading| {
            let mut r: Vec<(String, Reading)> = default_checks()
                .into_iter()
                .map(|c| (c.name, Reading::Value(if c.min.is_some() { 100.0 } else { 0.0 })))
                .collect();
            r[0].1 = lag;
            r[4].1 = dl;
            r
        };
        a.measure(&all(Reading::Value(0.0), Reading::Value(0.0)));
        assert_eq!(one_shot(&a.tallies), Outcome::Pass);
        // A non-critical failure within its limit is still a failure for a one-shot.
        a.measure(&all(Reading::Value(5000.0), Reading::Value(0.0)));
        assert_eq!(one_shot(&a.tallies), Outcome::Fail);
        a.measure(&all(Reading::Error("broker down".into()), Reading::Value(0.0)));
        assert_eq!(one_shot(&a.tallies), Outcome::Inconclusive);
        a.measure(&all(Reading::Value(0.0), Reading::NoData));
        assert_eq!(one_shot(&a.tallies), Outcome::Inconclusive);
        a.measure(&all(Reading::Error("broker down".into()), Reading::Value(1.0)));
        assert_eq!(one_shot(&a.tallies), Outcome::Fail, "a failure wins over an error");
        assert_eq!(one_shot(&Analysis::new(default_checks()).tallies), Outcome::Inconclusive, "never measured");
    }

    #[test]
    fn configured_settings_lay_over_the_defaults() {
        use crate::config::CheckSettings;
        let settings = std::collections::BTreeMap::from([
            ("forward_lag".to_string(), CheckSettings { max: Some(5000.0), ..Default::default() }),
            ("dead_letters".to_string(), CheckSettings { critical: Some(false), ..Default::default() }),
            ("conflicts".to_string(), CheckSettings { critical: Some(true), ..Default::default() }),
        ]);
        let checks = configured(&settings);
        let get = |n: &str| checks.iter().find(|c| c.name == n).unwrap().clone();
        assert_eq!(
            (get("forward_lag").max, get("forward_lag").min, get("forward_lag").critical),
            (Some(5000.0), None, false)
        );
        let dl = get("dead_letters");
        assert_eq!((dl.critical, dl.failure_limit), (false, 2), "no longer critical: tolerated like the others");
        let c = get("conflicts");
        assert_eq!((c.critical, c.failure_limit), (true, 0), "critical: the first failure rolls back");
        assert_eq!(get("verify_score"), default_checks().into_iter().find(|c| c.name == "verify_score").unwrap());
        let names: Vec<String> = default_checks().into_iter().map(|c| c.name).collect();
        assert_eq!(names, crate::config::ANALYSIS_CHECKS, "the configuration knows every check by name");
    }

    #[test]
    fn a_plan_only_grows_going_up_and_only_shrinks_going_down() {
        let up = Rollout::new(0, None, &[10, 50, 100], MIN5).unwrap();
        assert!(up.up());
        assert_eq!(up.target(), 100);
        let down = Rollout::new(100, Some(0), &[50, 10, 0], MIN5).unwrap();
        assert!(!down.up());
        let err = Rollout::new(0, None, &[10, 50, 30], MIN5).unwrap_err();
        assert_eq!(err, ["50% → 30%: shares only grow going up (from 0%)"]);
        let err = Rollout::new(100, Some(0), &[50, 60, 10], MIN5).unwrap_err();
        assert_eq!(
            err,
            ["50% → 60%: shares only shrink going down (from 100%)", "the plan ends at 10%, not at --to 0%"]
        );
        assert!(Rollout::new(50, None, &[50, 60], MIN5).is_err(), "a step to where it is");
        assert!(Rollout::new(0, None, &[], MIN5).is_err());
        assert!(Rollout::new(0, None, &[10, 150], MIN5).is_err());
        assert_eq!(parse_shares("10, 50,100"), Ok(vec![10, 50, 100]));
        assert!(parse_shares("10,fifty").unwrap_err().contains("`fifty`"));
    }

    #[test]
    fn a_plan_resumes_from_what_finished_and_walks_back_to_the_last_good_share() {
        let r = Rollout::new(0, None, &[10, 50, 100], MIN5).unwrap();
        assert_eq!(r.next(&[], 0), Next::Move(10));
        assert_eq!(r.next(&[], 10), Next::Hold(10), "moved, killed before its hold finished");
        assert_eq!(r.next(&[10], 10), Next::Move(50));
        assert_eq!(r.next(&[10, 50, 100], 100), Next::Done);
        assert_eq!(r.last_good(&[]), 0);
        assert_eq!(r.last_good(&[10]), 10);
        assert_eq!(r.last_good(&[10, 50]), 50);
    }

    fn readings(pairs: &[(&str, Reading)]) -> Vec<(String, Reading)> {
        pairs.iter().map(|(n, r)| (n.to_string(), r.clone())).collect()
    }

    fn all_passing() -> Vec<(String, Reading)> {
        default_checks()
            .iter()
            .map(|c| (c.name.clone(), Reading::Value(if c.name == "verify_score" { 100.0 } else { 0.0 })))
            .collect()
    }

    fn with(name: &str, r: Reading) -> Vec<(String, Reading)> {
        let mut all = all_passing();
        all.iter_mut().find(|(n, _)| n == name).unwrap().1 = r;
        all
    }

    #[test]
    fn silence_holds_and_never_passes() {
        let mut a = Analysis::new(default_checks());
        assert_eq!(
            a.measure(&[]),
            Verdict::Inconclusive { checks: default_checks().into_iter().map(|c| c.name).collect() }
        );
        let v = a.measure(&with("forward_lag", Reading::NoData));
        assert_eq!(v, Verdict::Inconclusive { checks: vec!["forward_lag".into()] });
        assert!(!hold_over(MIN5 * 2, MIN5, Some(&v)), "time is up, but the last measurement had no data");
        let v = a.measure(&all_passing());
        assert_eq!(v, Verdict::Pass);
        assert!(hold_over(MIN5, MIN5, Some(&v)));
        assert!(!hold_over(MIN5 / 2, MIN5, Some(&v)), "time is not up");
        // NaN is no data: neither a pass nor a failure.
        for _ in 0..5 {
            assert!(matches!(a.measure(&with("forward_lag", Reading::Value(f64::NAN))), Verdict::Inconclusive { .. }));
        }
        assert_eq!(a.tallies[0].failures, 0);
    }

    #[test]
    fn a_critical_failure_rolls_back_at_once_naming_the_check_its_value_and_bound() {
        let mut a = Analysis::new(default_checks());
        let Verdict::RollBack(why) = a.measure(&with("dead_letters", Reading::Value(3.0))) else { panic!() };
        assert_eq!((why.check.as_str(), why.value, why.bounds.as_str()), ("dead_letters", Some(3.0), "≤ 0"));
        assert!(why.to_string().starts_with("dead_letters = 3 (wanted ≤ 0)"), "{why}");
        // A critical failure outranks a non-critical one in the same measurement.
        let mut a = Analysis::new(default_checks());
        let mut r = with("fence_violations", Reading::Value(1.0));
        r.extend(readings(&[("conflicts", Reading::Value(99.0))]));
        assert!(matches!(a.measure(&r), Verdict::RollBack(w) if w.check == "fence_violations"));
    }

    #[test]
    fn a_non_critical_failure_stops_the_plan_only_past_its_limit() {
        let mut a = Analysis::new(default_checks());
        let lagging = with("forward_lag", Reading::Value(5000.0));
        assert_eq!(a.measure(&lagging), Verdict::Inconclusive { checks: vec!["forward_lag".into()] });
        assert_eq!(a.measure(&lagging), Verdict::Inconclusive { checks: vec!["forward_lag".into()] });
        let Verdict::Stop(why) = a.measure(&lagging) else { panic!() };
        assert_eq!((why.check.as_str(), why.value), ("forward_lag", Some(5000.0)));
        assert!(why.detail.contains("3 times"), "{why}");
    }

    #[test]
    fn errors_are_not_failures_until_too_many_in_a_row() {
        let mut a = Analysis::new(default_checks());
        let erring = with("reverse_lag", Reading::Error("broker did not answer".into()));
        for _ in 0..3 {
            assert!(matches!(a.measure(&erring), Verdict::Inconclusive { .. }));
        }
        // A good reading resets the count.
        assert_eq!(a.measure(&all_passing()), Verdict::Pass);
        for _ in 0..3 {
            assert!(matches!(a.measure(&erring), Verdict::Inconclusive { .. }));
        }
        let Verdict::Stop(why) = a.measure(&erring) else { panic!() };
        assert_eq!(why.value, None);
        assert!(why.to_string().contains("could not be read") && why.detail.contains("broker did not answer"), "{why}");
    }
}
