//! What applications and operators read about a service's cutover (`GET /cutover`, `ficus
//! status --json`): its share, epoch, the step of a move under way, the fenced buckets, and
//! whether it can flip or roll back now. Pure: the I/O that gathers the inputs lives in
//! `status`.

use bson::Timestamp;
use serde::Serialize;

use super::log::CheckReading;
use super::moves::MoveRecord;
use super::ownership::{Fence, Ownership};
use super::plan::Phase;
use super::plans::PlanRecord;

/// A reverse feed's checkpoint older than this is stale: a rollback would wait on it.
pub const STALE_AFTER_SECS: u64 = 120;
/// A resume position within this share of the oldest end of the service database's change
/// history is about to be lost to it.
pub const HISTORY_MARGIN: f64 = 0.1;

/// The reverse feed of a service as seen from outside.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReverseFeed {
    /// The reverse tail's checkpoint: its position, and how old its token is.
    pub position: Option<Timestamp>,
    pub token_age_secs: Option<u64>,
    /// The oldest and newest entries of the service database's change history.
    pub history: Option<(Timestamp, Timestamp)>,
    /// Whether the reverse tail is still needed (the service owns keys, or has not been read
    /// past its return to 0%).
    pub needed: bool,
}

/// One service's cutover state.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CutoverState {
    pub service: String,
    pub percent: u8,
    pub epoch: i64,
    /// The next step of a move under way (`stable` when none is).
    pub phase: String,
    /// The move under way: from and to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moving: Option<(u8, u8)>,
    pub fenced: Option<Fence>,
    /// A move under way has passed its gates and only its flip is left.
    pub can_flip: bool,
    /// Every write the service made is on its way back to the monolith: going back to 0%
    /// loses nothing.
    pub can_rollback: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_no_rollback: Option<String>,
    pub forward_lag: Option<i64>,
    pub reverse_lag: Option<i64>,
    /// A progressive rollout under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanState>,
}

/// A progressive rollout under way, as `GET /cutover` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanState {
    pub from: u8,
    pub shares: Vec<u8>,
    /// The shares whose hold finished.
    pub held: Vec<u8>,
    /// The share held now, and the seconds left of its hold.
    pub holding: Option<u8>,
    pub hold_left_secs: Option<u64>,
    /// The last measurement: when (RFC 3339) and each check's value, bounds and result.
    pub measured_at: Option<String>,
    pub analysis: Vec<CheckReading>,
}

/// A plan's state now.
pub fn plan_state(p: &PlanRecord, now: bson::DateTime) -> PlanState {
    PlanState {
        from: p.from,
        shares: p.shares.clone(),
        held: p.held.clone(),
        holding: p.holding.map(|h| h.at),
        hold_left_secs: p.hold_left_secs(now),
        measured_at: p.last.as_ref().and_then(|m| m.at.try_to_rfc3339_string().ok()),
        analysis: p.last.as_ref().map(|m| m.readings.clone()).unwrap_or_default(),
    }
}

/// Why a rollback would lose writes now (`None`: it would not).
pub fn rollback_blocked(feed: &ReverseFeed) -> Option<String> {
    if !feed.needed {
        return None;
    }
    let Some(position) = feed.position else {
        return Some("the reverse feed has not started".into());
    };
    if let Some(age) = feed.token_age_secs
        && age > STALE_AFTER_SECS
    {
        return Some(format!("the reverse feed is stalled: its resume token is {age}s old"));
    }
    if let Some((oldest, newest)) = feed.history {
        let window = f64::from(newest.time.saturating_sub(oldest.time));
        let ahead = f64::from(position.time.saturating_sub(oldest.time));
        if position < oldest {
            return Some("the reverse feed's resume position has left the service database's change history".into());
        }
        if window > 0.0 && ahead < window * HISTORY_MARGIN {
            return Some(format!(
                "the reverse feed's resume position is {ahead:.0}s from the oldest end of the service database's \
                 change history ({window:.0}s): it is about to be lost"
            ));
        }
    }
    None
}

/// A service's state from its records and its feeds.
pub fn state(
    service: &str,
    ownership: Option<&Ownership>,
    record: Option<&MoveRecord>,
    plan: Option<PlanState>,
    feed: &ReverseFeed,
    lags: (Option<i64>, Option<i64>),
) -> CutoverState {
    let under_way = record.filter(|r| r.mv.next().is_some());
    let next = under_way.and_then(|r| r.mv.next());
    let why = rollback_blocked(feed);
    CutoverState {
        service: service.to_string(),
        percent: ownership.map_or(0, |o| o.percent),
        epoch: ownership.map_or(0, |o| o.epoch),
        phase: next.map_or("stable", Phase::name).to_string(),
        moving: under_way.map(|r| (r.mv.from, r.mv.to)),
        fenced: ownership.and_then(|o| o.fenced),
        can_flip: next == Some(Phase::Flip),
        can_rollback: why.is_none(),
        why_no_rollback: why,
        forward_lag: lags.0,
        reverse_lag: lags.1,
        plan,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cutover::plan::Move;

    fn ts(time: u32) -> Timestamp {
        Timestamp { time, increment: 0 }
    }

    #[test]
    fn a_rollback_is_safe_only_while_the_reverse_feed_follows_within_history() {
        let healthy = ReverseFeed {
            position: Some(ts(1_000)),
            token_age_secs: Some(3),
            history: Some((ts(0), ts(1_000))),
            needed: true,
        };
        assert_eq!(rollback_blocked(&healthy), None);
        let never = ReverseFeed { needed: false, ..Default::default() };
        assert_eq!(rollback_blocked(&never), None, "nothing to hand back");
        let unstarted = ReverseFeed { position: None, ..healthy.clone() };
        assert!(rollback_blocked(&unstarted).unwrap().contains("not started"));
        let stalled = ReverseFeed { token_age_secs: Some(STALE_AFTER_SECS + 1), ..healthy.clone() };
        assert!(rollback_blocked(&stalled).unwrap().contains("stalled"));
        let near = ReverseFeed { position: Some(ts(50)), ..healthy.clone() };
        assert!(rollback_blocked(&near).unwrap().contains("about to be lost"), "5% from the oldest end");
        let gone = ReverseFeed { position: Some(ts(10)), history: Some((ts(20), ts(1_000))), ..healthy };
        assert!(rollback_blocked(&gone).unwrap().contains("left"));
    }

    #[test]
    fn the_state_names_the_step_under_way_and_when_only_the_flip_is_left() {
        let feed = ReverseFeed::default();
        let mut r = MoveRecord::new(Move::plan("s", 0, 50).unwrap());
        for p in [Phase::Plan, Phase::Preflight, Phase::Fence, Phase::Drain, Phase::Verify] {
            r.done(p);
        }
        let s = state("s", None, Some(&r), None, &feed, (Some(0), None));
        assert_eq!((s.phase.as_str(), s.can_flip, s.moving), ("record-start", false, Some((0, 50))));
        r.done(Phase::RecordStart);
        let s = state("s", None, Some(&r), None, &feed, (None, None));
        assert_eq!((s.phase.as_str(), s.can_flip), ("flip", true));
        r.done(Phase::Flip);
        r.done(Phase::Observe);
        let s = state("s", None, Some(&r), None, &feed, (None, None));
        assert_eq!((s.phase.as_str(), s.can_flip, s.moving), ("stable", false, None));
        let json = serde_json::to_value(&s).unwrap();
        assert!(json.get("canRollback").is_some() && json.get("forwardLag").is_some(), "{json}");
    }
}
