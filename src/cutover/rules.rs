//! How a change is applied on the other side, given ownership (pure): as the owner's write, or
//! merged field by field as a non-owner's.
//!
//! A change made on one side to a key is the **owner's** write when that side owned the key when
//! the change was committed *and* still owns it when ficus applies it, and the change is no fence
//! violation. Anything else is merged (`sink::merge`) against the change's own pre-image, with
//! conflicts recorded and the owner's value standing:
//!
//! - a **non-owner** write: the other side owned the key when the change was committed (the
//!   monolith's own code still touching a cut-over customer, an application acting on an old
//!   view after a forced move);
//! - a **late** change: its side owned the key when it was committed, but the key changed owner
//!   before ficus applied it (a consumer a few seconds behind a forced move, a redelivery, a
//!   replay, a dead letter re-driven). Applied as the owner's, it would overwrite what the new
//!   owner has written since;
//! - a **fence violation**: a write on the losing side of a safe cutover to a fenced key after
//!   the fence's drain point (every application seen had acknowledged the fence, or the longest
//!   allowed view age had passed), committed before the flip. It is counted and reported too.
//!
//! "Now" is the view the consumer holds (see `ownership::OwnershipFeed::fresh`); the commit
//! time is judged on the change's own side's clock.

use bson::Timestamp;

use super::ownership::{Drain, Ownership, Side};
use super::route;

/// How a change is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// As the owner's write: a forward upsert, a write-back patch.
    Owner,
    /// Merged as a non-owner's, for this reason.
    Merge(Why),
}

/// Why a change is merged rather than applied as the owner's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The other side owned the key when the change was committed.
    NonOwner,
    /// The change's side owned the key then, but the key has changed owner since.
    Late,
    /// A write to a fenced key on the losing side after the drain point.
    FenceViolation,
    /// A dead letter re-driven after later changes of its document were applied (never from
    /// [`judge`]: the sink finds it out): its own fields land, the newer values stand.
    Redriven,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::NonOwner => "non-owner",
            Why::Late => "late",
            Why::FenceViolation => "fence-violation",
            Why::Redriven => "redriven",
        }
    }
}

/// The side that owns a key in `bucket` under a share of `percent`.
fn owner(percent: u8, bucket: u8) -> Side {
    if route::owns(percent, bucket) { Side::Service } else { Side::Monolith }
}

/// How a change made on `side` to a key in `bucket`, committed at `ts` on that side's clock, is
/// applied, given the service's ownership record as the current view has it (`None`: the
/// service never owned anything, the monolith owns every key). Pending steps are the caller's
/// to wait out (`View::judge`).
pub fn judge(o: Option<&Ownership>, side: Side, bucket: u8, ts: Timestamp) -> Apply {
    let Some(o) = o else {
        return if side == Side::Monolith { Apply::Owner } else { Apply::Merge(Why::NonOwner) };
    };
    if violates_fence(o, side, bucket, ts) {
        return Apply::Merge(Why::FenceViolation);
    }
    if owner(o.percent_at(side, ts), bucket) != side {
        return Apply::Merge(Why::NonOwner);
    }
    if owner(o.percent, bucket) != side {
        return Apply::Merge(Why::Late);
    }
    Apply::Owner
}

/// How the **echo** of a write-back (the monolith's change that ficus's own write of a service
/// change caused) is applied to the service's document: `None`, skipped, where the service
/// owned the key when the echo was committed (an owner's write-back: the service holds what it
/// wrote). Otherwise it is the monolith's state after merging a non-owner's service write, and
/// the service must come to hold it like any monolith change: as the owner's where the monolith
/// owns the key now, merged where the service has owned it since (late). Never a fence
/// violation: a fence holds applications' writes, and a write-back of a service write made on a
/// view as old as the contract allows may land after the drain point. Skipped, such an echo
/// left the service with what the monolith's earlier changes (applied as the owner's, their
/// documents from before the write-back) had made of the field, while the monolith held the
/// service's value: the two differed for good.
pub fn judge_echo(o: Option<&Ownership>, bucket: u8, ts: Timestamp) -> Option<Apply> {
    let Some(o) = o else { return Some(Apply::Owner) };
    if owner(o.percent_at(Side::Monolith, ts), bucket) == Side::Service {
        return None;
    }
    if owner(o.percent, bucket) == Side::Service {
        return Some(Apply::Merge(Why::Late));
    }
    Some(Apply::Owner)
}

/// Whether a change on `side` to a key in `bucket` at `ts` was made after a drain point of a
/// fence that side was losing, before the flip that lifted it (or with the fence still up).
pub fn violates_fence(o: &Ownership, side: Side, bucket: u8, ts: Timestamp) -> bool {
    let up = o.fenced.is_some_and(|f| {
        f.losing == side && (f.from..f.to).contains(&bucket) && matches!(f.drain, Drain::At(at) if ts > at)
    });
    let lifted = o.history.iter().filter(|s| !s.pending).any(|s| {
        let flipped = match side {
            Side::Monolith => s.at_monolith,
            Side::Service => s.at_service,
        };
        s.lifted.is_some_and(|d| d.losing == side && d.holds(bucket) && ts > d.at && ts <= flipped)
    });
    up || lifted
}

#[cfg(test)]
mod tests {
    use bson::DateTime;

    use super::*;
    use crate::cutover::ownership::{Drained, Fence, Step};

    fn ts(time: u32) -> Timestamp {
        Timestamp { time, increment: 0 }
    }

    /// A step to `percent` at monolith time `m` and service time `s`.
    fn step(epoch: i64, percent: u8, m: u32, s: u32, lifted: Option<Drained>) -> Step {
        Step {
            epoch,
            percent,
            at_monolith: ts(m),
            at_service: ts(s),
            set_at: DateTime::from_millis(0),
            forced: false,
            pending: false,
            lifted,
        }
    }

    fn record(percent: u8, history: Vec<Step>, fenced: Option<Fence>) -> Ownership {
        Ownership {
            service: "customers_db".into(),
            epoch: history.len() as i64,
            revision: 0,
            percent,
            history,
            updated: DateTime::from_millis(0),
            fenced,
        }
    }

    /// Buckets below and above 50.
    const LOW: u8 = 20;
    const HIGH: u8 = 70;

    #[test]
    fn without_a_record_the_monolith_owns_everything() {
        assert_eq!(judge(None, Side::Monolith, HIGH, ts(5)), Apply::Owner);
        assert_eq!(judge(None, Side::Service, LOW, ts(5)), Apply::Merge(Why::NonOwner));
    }

    #[test]
    fn a_change_is_the_owners_only_if_its_side_owned_the_key_then_and_owns_it_now() {
        // 50% from monolith time 100 / service time 1000.
        let o = record(50, vec![step(1, 50, 100, 1000, None)], None);
        // The monolith's change to a key it keeps, before and after the move.
        assert_eq!(judge(Some(&o), Side::Monolith, HIGH, ts(50)), Apply::Owner);
        assert_eq!(judge(Some(&o), Side::Monolith, HIGH, ts(150)), Apply::Owner);
        // The monolith's change to a key the service owns now: committed before the move, it is
        // late (applied as the owner's it would erase the service's writes since); after, it is
        // a non-owner's.
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(50)), Apply::Merge(Why::Late));
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(150)), Apply::Merge(Why::NonOwner));
        // The service's own writes.
        assert_eq!(judge(Some(&o), Side::Service, LOW, ts(1500)), Apply::Owner);
        assert_eq!(judge(Some(&o), Side::Service, HIGH, ts(1500)), Apply::Merge(Why::NonOwner));
        assert_eq!(judge(Some(&o), Side::Service, LOW, ts(900)), Apply::Merge(Why::NonOwner), "before it owned");
    }

    #[test]
    fn a_service_write_written_back_after_a_rollback_is_late() {
        // 50% at service time 1000, back to 0% at 2000.
        let o = record(0, vec![step(1, 50, 100, 1000, None), step(2, 0, 200, 2000, None)], None);
        assert_eq!(judge(Some(&o), Side::Service, LOW, ts(1500)), Apply::Merge(Why::Late));
        assert_eq!(judge(Some(&o), Side::Service, LOW, ts(2500)), Apply::Merge(Why::NonOwner));
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(150)), Apply::Merge(Why::NonOwner), "while it was owned");
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(250)), Apply::Owner);
    }

    #[test]
    fn writes_on_the_losing_side_after_the_drain_point_are_fence_violations_until_the_flip() {
        // Moving 0 → 50: the monolith loses buckets 0..50, drained at monolith time 300.
        let fence = |drain| Fence {
            from: 0,
            to: 50,
            epoch: 1,
            losing: Side::Monolith,
            drain,
            set_at: DateTime::from_millis(0),
        };
        let o = record(0, vec![], Some(fence(Drain::At(ts(300)))));
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(299)), Apply::Owner, "drained before the flip");
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(301)), Apply::Merge(Why::FenceViolation));
        assert_eq!(judge(Some(&o), Side::Monolith, HIGH, ts(301)), Apply::Owner, "not fenced");
        assert_eq!(judge(Some(&o), Side::Service, LOW, ts(301)), Apply::Merge(Why::NonOwner), "not the service's yet");
        // Not drained yet: nothing is a violation.
        let o = record(0, vec![], Some(fence(Drain::NotYet)));
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(301)), Apply::Owner);
        // Flipped at monolith time 400: violations stay violations, applied whenever; writes
        // after the flip are the non-owner's.
        let drained = Drained { from: 0, to: 50, losing: Side::Monolith, at: ts(300) };
        let o = record(50, vec![step(1, 50, 400, 4000, Some(drained))], None);
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(250)), Apply::Merge(Why::Late));
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(350)), Apply::Merge(Why::FenceViolation));
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(450)), Apply::Merge(Why::NonOwner));
        assert_eq!(judge(Some(&o), Side::Monolith, HIGH, ts(350)), Apply::Owner);
        // The way back (50 → 0): the service loses, on its own clock.
        let back = Drained { from: 0, to: 50, losing: Side::Service, at: ts(5000) };
        let o = record(0, vec![step(1, 50, 400, 4000, Some(drained)), step(2, 0, 600, 6000, Some(back))], None);
        assert_eq!(judge(Some(&o), Side::Service, LOW, ts(4500)), Apply::Merge(Why::Late));
        assert_eq!(judge(Some(&o), Side::Service, LOW, ts(5500)), Apply::Merge(Why::FenceViolation));
        assert_eq!(judge(Some(&o), Side::Service, LOW, ts(6500)), Apply::Merge(Why::NonOwner));
    }

    #[test]
    fn an_echo_is_skipped_only_where_the_service_owned_the_key_when_it_was_written_back() {
        // 50% from monolith time 100.
        let o = record(50, vec![step(1, 50, 100, 1000, None)], None);
        // The owner's write-back: the service holds it.
        assert_eq!(judge_echo(Some(&o), LOW, ts(150)), None);
        // A non-owner's service write merged into the monolith, which owns the key: its state.
        assert_eq!(judge_echo(Some(&o), HIGH, ts(150)), Some(Apply::Owner));
        // Written back while the monolith owned the key, applied once the service does: merged.
        assert_eq!(judge_echo(Some(&o), LOW, ts(50)), Some(Apply::Merge(Why::Late)));
        assert_eq!(judge_echo(None, LOW, ts(50)), Some(Apply::Owner));
        // Moving 0 → 50, drained at monolith time 300: a write-back landing after the drain
        // point is ficus's own, no violation, and the monolith still owns the key.
        let fence = Fence {
            from: 0,
            to: 50,
            epoch: 1,
            losing: Side::Monolith,
            drain: Drain::At(ts(300)),
            set_at: DateTime::from_millis(0),
        };
        let o = record(0, vec![], Some(fence));
        assert_eq!(judge(Some(&o), Side::Monolith, LOW, ts(301)), Apply::Merge(Why::FenceViolation));
        assert_eq!(judge_echo(Some(&o), LOW, ts(301)), Some(Apply::Owner));
    }
}
