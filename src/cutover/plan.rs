//! The safe cutover's state machine, as pure functions over owned data (issue #14): what a move
//! from one percentage to another changes, the steps it goes through in order, what the same
//! command does when it finds a move already under way (resume, or refuse a different one), and
//! what `--abort` returns to. The I/O of each step (fencing in the ownership records, the drain
//! marker, verifying the moving buckets, recording the reverse start) lives in the command that
//! drives this machine; this module decides, and is tested with fixtures.
//!
//! A move's record is persisted after every step, so a `kill -9` at any point followed by the
//! same command resumes at the first step not recorded as done.

use std::ops::Range;

use serde::{Deserialize, Serialize};

pub use super::ownership::Side;

/// The steps of a move, in the order they run. Going down (a rollback) is the same machine
/// with the sides swapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Which buckets move, and which way.
    Plan,
    /// The lens laws hold for the service; the consumers are healthy; the gaining side's
    /// reverse feed can start.
    Preflight,
    /// The moving buckets are fenced (epoch + 1): applications hold writes for their keys.
    Fence,
    /// A fence marker written on the losing side has been committed past by every consumer of
    /// the service on every partition.
    Drain,
    /// The service's documents in the moving buckets equal the forward transforms of the
    /// monolith's (every one of them, not the verify gate's share).
    Verify,
    /// The gaining side's change-stream position, recorded before anything can write there.
    RecordStart,
    /// The gaining side owns the buckets (epoch + 2), unfenced.
    Flip,
    /// Lags, echoes and conflicts reported; the move is done.
    Observe,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Plan,
        Phase::Preflight,
        Phase::Fence,
        Phase::Drain,
        Phase::Verify,
        Phase::RecordStart,
        Phase::Flip,
        Phase::Observe,
    ];

    /// The step after this one (`None` after the last).
    pub fn next(self) -> Option<Phase> {
        Phase::ALL.iter().position(|p| *p == self).and_then(|i| Phase::ALL.get(i + 1)).copied()
    }

    /// The step's name as printed, published (`GET /cutover`) and given to `--until`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Plan => "plan",
            Phase::Preflight => "preflight",
            Phase::Fence => "fence",
            Phase::Drain => "drain",
            Phase::Verify => "verify",
            Phase::RecordStart => "record-start",
            Phase::Flip => "flip",
            Phase::Observe => "observe",
        }
    }

    /// The step of a name (see [`Self::name`]).
    pub fn named(name: &str) -> Result<Phase, String> {
        Phase::ALL.into_iter().find(|p| p.name() == name).ok_or_else(|| {
            let names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
            format!("`{name}` is not a step of a cutover (steps: {})", names.join(", "))
        })
    }

    /// Whether a step changes what applications see (the ownership records): a dry run stops
    /// before the first of them.
    pub fn changes_ownership(self) -> bool {
        matches!(self, Phase::Fence | Phase::Flip)
    }
}

/// Bad input to a move: exit 2, nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("--to {0}: a percentage is 0 to 100")]
    OutOfRange(u16),
    #[error("{service} already owns {percent}%: nothing to move")]
    NothingToMove { service: String, percent: u8 },
    #[error(
        "a move of {service} from {from}% to {to}% is under way (at step {phase:?}): run `ficus cutover --service {service} --to {to}` to finish it, or add --abort to undo it, before asking for {asked}%"
    )]
    AnotherMoveUnderWay { service: String, from: u8, to: u8, phase: Phase, asked: u8 },
    #[error("{service}: no move under way to abort")]
    NothingToAbort { service: String },
}

/// One move of a service's share, and how far it has got. This is what the store keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub service: String,
    pub from: u8,
    pub to: u8,
    /// The last step recorded as done (`None`: none yet).
    pub done: Option<Phase>,
}

impl Move {
    /// A new move, checked: `to` within 0 to 100 and different from the current share.
    pub fn plan(service: &str, current: u8, to: u16) -> Result<Move, PlanError> {
        let to = u8::try_from(to).ok().filter(|t| *t <= 100).ok_or(PlanError::OutOfRange(to))?;
        if to == current {
            return Err(PlanError::NothingToMove { service: service.to_string(), percent: current });
        }
        Ok(Move { service: service.to_string(), from: current, to, done: None })
    }

    /// The buckets that change hands: `[min, max)` of the two percentages (a key's bucket is
    /// owned by the service iff it is below the percentage).
    pub fn buckets(&self) -> Range<u8> {
        self.from.min(self.to)..self.from.max(self.to)
    }

    /// The side that gains the moving buckets.
    pub fn gaining(&self) -> Side {
        if self.to > self.from { Side::Service } else { Side::Monolith }
    }

    /// The side that loses them (and is drained to a marker before the flip).
    pub fn losing(&self) -> Side {
        match self.gaining() {
            Side::Service => Side::Monolith,
            Side::Monolith => Side::Service,
        }
    }

    /// The next step to run (`None`: the move is complete).
    pub fn next(&self) -> Option<Phase> {
        match self.done {
            None => Some(Phase::Plan),
            Some(p) => p.next(),
        }
    }

    /// Records a step as done. Steps are done in order; recording one out of order is a bug in
    /// the driver, not an input error.
    pub fn record(&mut self, phase: Phase) {
        assert_eq!(self.next(), Some(phase), "cutover steps run in order");
        self.done = Some(phase);
    }

    /// The move as the ownership record shows it: a flip stored (the record at `to`, nothing
    /// fenced or pending) but not yet recorded in the move when the command was killed is done.
    pub fn reconciled(mut self, percent: u8, fenced: bool, pending: bool) -> Move {
        if self.next() == Some(Phase::Flip) && percent == self.to && !fenced && !pending {
            self.done = Some(Phase::Flip);
        }
        self
    }

    /// Whether the flip has happened (from then on the gaining side writes the buckets).
    pub fn flipped(&self) -> bool {
        self.done.is_some_and(|p| p >= Phase::Flip)
    }

    /// Whether the buckets are fenced now (fenced and not yet flipped).
    pub fn fenced(&self) -> bool {
        self.done.is_some_and(|p| p >= Phase::Fence) && !self.flipped()
    }
}

/// What the command does, given the move the store holds (if any) and what it was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start this new move.
    Start(Move),
    /// Carry on with the stored move from its next step.
    Resume(Move),
    /// `--abort`: undo a move that has not flipped (unfence, back to its `from`), recorded as
    /// the share the service keeps.
    Abort { service: String, back_to: u8, unfence: bool },
    /// `--abort` after the flip: the way back is the same machine the other way.
    Reverse(Move),
}

/// Decides what `ficus cutover --service S --to P [--abort]` does. `stored` is the move in the
/// store, if one is; `current` the share the ownership records give now.
pub fn decide(service: &str, current: u8, stored: Option<&Move>, to: u16, abort: bool) -> Result<Decision, PlanError> {
    let under_way = stored.filter(|m| m.next().is_some());
    match (under_way, abort) {
        (None, true) => Err(PlanError::NothingToAbort { service: service.to_string() }),
        (Some(m), true) if m.flipped() => {
            let back = Move { service: m.service.clone(), from: m.to, to: m.from, done: None };
            Ok(Decision::Reverse(back))
        }
        (Some(m), true) => Ok(Decision::Abort { service: m.service.clone(), back_to: m.from, unfence: m.fenced() }),
        (Some(m), false) if u16::from(m.to) == to => Ok(Decision::Resume(m.clone())),
        (Some(m), false) => Err(PlanError::AnotherMoveUnderWay {
            service: m.service.clone(),
            from: m.from,
            to: m.to,
            phase: m.next().unwrap_or(Phase::Observe),
            asked: u8::try_from(to).unwrap_or(u8::MAX),
        }),
        (None, false) => Move::plan(service, current, to).map(Decision::Start),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(m: &Move, done: Phase) -> Move {
        Move { done: Some(done), ..m.clone() }
    }

    #[test]
    fn a_move_names_its_buckets_and_sides_both_ways() {
        let up = Move::plan("customers_db", 10, 50).unwrap();
        assert_eq!(up.buckets(), 10..50);
        assert_eq!((up.gaining(), up.losing()), (Side::Service, Side::Monolith));
        let down = Move::plan("customers_db", 50, 0).unwrap();
        assert_eq!(down.buckets(), 0..50);
        assert_eq!((down.gaining(), down.losing()), (Side::Monolith, Side::Service));
        // Bucket 37 moves in both; bucket 62 in neither.
        assert!(up.buckets().contains(&37) && down.buckets().contains(&37));
        assert!(!up.buckets().contains(&62) && !down.buckets().contains(&62));
    }

    #[test]
    fn bad_percentages_are_input_errors() {
        assert_eq!(Move::plan("s", 0, 101), Err(PlanError::OutOfRange(101)));
        assert_eq!(Move::plan("s", 0, 300), Err(PlanError::OutOfRange(300)));
        assert!(matches!(Move::plan("s", 50, 50), Err(PlanError::NothingToMove { percent: 50, .. })));
        assert!(Move::plan("s", 0, 100).is_ok());
    }

    #[test]
    fn steps_run_in_order_and_fencing_lasts_until_the_flip() {
        let mut m = Move::plan("s", 0, 10).unwrap();
        let mut seen = Vec::new();
        while let Some(p) = m.next() {
            assert_eq!(m.fenced(), seen.contains(&Phase::Fence) && !seen.contains(&Phase::Flip), "before {p:?}");
            m.record(p);
            seen.push(p);
        }
        assert_eq!(seen, Phase::ALL);
        assert!(m.flipped() && !m.fenced());
        assert_eq!(
            Phase::ALL.iter().filter(|p| p.changes_ownership()).copied().collect::<Vec<_>>(),
            [Phase::Fence, Phase::Flip]
        );
    }

    #[test]
    #[should_panic(expected = "in order")]
    fn a_step_out_of_order_is_a_bug() {
        let mut m = Move::plan("s", 0, 10).unwrap();
        m.record(Phase::Fence);
    }

    #[test]
    fn the_same_command_resumes_and_a_different_one_is_refused() {
        let m = Move::plan("s", 10, 50).unwrap();
        for done in Phase::ALL.iter().take(7) {
            let stored = at(&m, *done);
            assert_eq!(decide("s", 10, Some(&stored), 50, false), Ok(Decision::Resume(stored.clone())));
            assert!(matches!(
                decide("s", 10, Some(&stored), 100, false),
                Err(PlanError::AnotherMoveUnderWay { to: 50, asked: 100, .. })
            ));
        }
        // A finished move is history: the next command plans a new one from the share now.
        let finished = at(&m, Phase::Observe);
        assert_eq!(
            decide("s", 50, Some(&finished), 100, false),
            Ok(Decision::Start(Move { service: "s".into(), from: 50, to: 100, done: None }))
        );
        assert!(matches!(decide("s", 50, Some(&finished), 50, false), Err(PlanError::NothingToMove { .. })));
        assert_eq!(decide("s", 0, None, 101, false), Err(PlanError::OutOfRange(101)));
    }

    #[test]
    fn a_flip_stored_before_a_kill_is_done_and_only_then() {
        let m = at(&Move::plan("s", 10, 50).unwrap(), Phase::RecordStart);
        assert_eq!(m.clone().reconciled(50, false, false).done, Some(Phase::Flip));
        assert_eq!(m.clone().reconciled(10, true, true).done, Some(Phase::RecordStart), "pending: not flipped");
        assert_eq!(m.clone().reconciled(10, true, false).done, Some(Phase::RecordStart));
        let earlier = at(&Move::plan("s", 10, 50).unwrap(), Phase::Drain);
        assert_eq!(earlier.clone().reconciled(50, false, false), earlier, "only a move at its flip");
    }

    #[test]
    fn abort_unfences_before_the_flip_and_goes_back_the_other_way_after_it() {
        let m = Move::plan("s", 10, 50).unwrap();
        assert_eq!(
            decide("s", 10, Some(&at(&m, Phase::Preflight)), 50, true),
            Ok(Decision::Abort { service: "s".into(), back_to: 10, unfence: false })
        );
        for done in [Phase::Fence, Phase::Drain, Phase::Verify, Phase::RecordStart] {
            assert_eq!(
                decide("s", 10, Some(&at(&m, done)), 50, true),
                Ok(Decision::Abort { service: "s".into(), back_to: 10, unfence: true }),
                "{done:?}"
            );
        }
        assert_eq!(
            decide("s", 50, Some(&at(&m, Phase::Flip)), 50, true),
            Ok(Decision::Reverse(Move { service: "s".into(), from: 50, to: 10, done: None }))
        );
        assert!(matches!(
            decide("s", 50, Some(&at(&m, Phase::Observe)), 50, true),
            Err(PlanError::NothingToAbort { .. })
        ));
        assert!(matches!(decide("s", 50, None, 50, true), Err(PlanError::NothingToAbort { .. })));
    }
}
