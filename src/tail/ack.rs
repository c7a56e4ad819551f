//! The tail's acknowledgement window: which point of the source may be checkpointed, given the
//! acknowledgements Kafka has sent so far.
//!
//! Changes are handed to the publisher in source order, each with as many acknowledgements to
//! wait for as it made events (none for a change no topic wants, or a quiet period's resume
//! token). Acknowledgements arrive in any order; the window only ever reports the newest point
//! whose every earlier change is fully acknowledged, so a checkpoint never passes an event that
//! is not durably on Kafka.

use std::collections::VecDeque;

/// Names one change in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(u64);

#[derive(Debug)]
struct Entry<P> {
    point: P,
    pending: usize,
}

/// Points in source order, each waiting for its acknowledgements.
#[derive(Debug)]
pub struct AckWindow<P> {
    entries: VecDeque<Entry<P>>,
    /// The ticket of `entries[0]`.
    first: u64,
    /// Acknowledgements awaited over the whole window.
    in_flight: usize,
}

impl<P> Default for AckWindow<P> {
    fn default() -> Self {
        AckWindow { entries: VecDeque::new(), first: 0, in_flight: 0 }
    }
}

impl<P> AckWindow<P> {
    /// Adds the next change in source order, reached once `acks` acknowledgements arrive.
    pub fn push(&mut self, point: P, acks: usize) -> Ticket {
        self.entries.push_back(Entry { point, pending: acks });
        self.in_flight += acks;
        Ticket(self.first + self.entries.len() as u64 - 1)
    }

    /// One acknowledgement of a change arrived.
    pub fn ack(&mut self, t: Ticket) {
        let Some(i) = t.0.checked_sub(self.first) else { return };
        if let Some(e) = self.entries.get_mut(i as usize)
            && e.pending > 0
        {
            e.pending -= 1;
            self.in_flight -= 1;
        }
    }

    /// The newest point whose every earlier change is acknowledged, if it moved; the changes up
    /// to it leave the window.
    pub fn covered(&mut self) -> Option<P> {
        self.covered_where(|_| true)
    }

    /// [`Self::covered`], among the points `usable` accepts (a change inside a transaction whose
    /// marker came before it is no point to resume from); the others leave the window too.
    pub fn covered_where(&mut self, usable: impl Fn(&P) -> bool) -> Option<P> {
        let mut newest = None;
        while self.entries.front().is_some_and(|e| e.pending == 0) {
            let point = self.entries.pop_front().map(|e| e.point);
            self.first += 1;
            if point.as_ref().is_some_and(&usable) {
                newest = point;
            }
        }
        newest
    }

    /// Acknowledgements still awaited (for backpressure).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checkpoint_never_passes_a_change_still_waiting() {
        let mut w = AckWindow::default();
        let a = w.push("a", 2);
        let b = w.push("b", 1);
        let c = w.push("c", 0); // a change no topic wants
        let d = w.push("d", 1);
        assert_eq!(w.in_flight(), 4);
        // Later changes acknowledged first: nothing is covered while `a` waits.
        w.ack(b);
        w.ack(d);
        assert_eq!(w.covered(), None);
        w.ack(a);
        assert_eq!(w.covered(), None, "`a` has two events");
        w.ack(a);
        assert_eq!(w.covered(), Some("d"), "a, b, c and d are all acknowledged");
        assert!(w.is_empty() && w.in_flight() == 0);
        let _ = c;
        // Stale or repeated acknowledgements change nothing.
        let e = w.push("e", 1);
        w.ack(a);
        w.ack(Ticket(99));
        assert_eq!(w.covered(), None);
        w.ack(e);
        w.ack(e);
        assert_eq!(w.covered(), Some("e"));
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn unusable_points_are_passed_over_but_never_lose_an_earlier_one() {
        let mut w = AckWindow::default();
        w.push(Some(1), 0);
        w.push(None, 0); // inside a transaction
        assert_eq!(w.covered_where(Option::is_some), Some(Some(1)));
        w.push(None, 0);
        assert_eq!(w.covered_where(Option::is_some), None, "nothing usable moved");
        w.push(Some(4), 0);
        assert_eq!(w.covered_where(Option::is_some), Some(Some(4)));
    }

    #[test]
    fn a_change_without_events_is_covered_once_everything_before_it_is() {
        let mut w = AckWindow::default();
        let a = w.push(1, 1);
        w.push(2, 0);
        assert_eq!(w.covered(), None);
        w.ack(a);
        assert_eq!(w.covered(), Some(2));
    }
}
