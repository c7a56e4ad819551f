//! Echo tagging: which changes of a source were ficus's own writes.
//!
//! A MongoDB change event does not say who wrote it, except that the events of a
//! multi-document transaction carry its `lsid` and `txnNumber`. Every batch ficus applies to a
//! database is one transaction that first writes a marker into `_ficus_applied` (see
//! `markers::COLLECTION`) naming the origin: the service (and, for a write-back into the monolith,
//! the service collection) whose write it is; and last a closing marker. So when the feed shows
//! a marker, every change of that same transaction, until its closing marker, is an echo of
//! that origin. Transactions are recognised by their `lsid` and `txnNumber`, never by cluster
//! time (secantusd-rs gives each event of a transaction its own), and never by adjacency: other
//! writers' changes may come between a transaction's events in the feed. Markers themselves are
//! bookkeeping and are never published. The tail never checkpoints while a marked transaction
//! is open ([`EchoTagger::in_marked`]): a resume there would meet its changes without their
//! marker.
//!
//! Only the closing marker ends a marked transaction: not a quiet feed, since secantusd-rs can
//! answer a `getMore` with an empty batch between two changes of one committed transaction.
//! A transaction whose closing marker never shows (an apply by a ficus from before closing
//! markers) is given up once the feed is [`MAX_TRANSACTION_SECS`] past its marker: no
//! transaction lives that long, so nothing of it can still come.

use std::collections::HashMap;

use bson::Timestamp;

use crate::event::Origin;
use crate::event::mapping::{ChangeRecord, TxnId};
use crate::markers::{self, COLLECTION as MARKERS, Read};

/// What a change turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// A marker: ficus's bookkeeping, not a document change.
    Marker,
    /// A document change, with its origin set when ficus's own write caused it.
    Change(Box<ChangeRecord>),
}

/// How far (in seconds of cluster time) the feed may go past a marker before its transaction,
/// its closing marker never seen, is given up. Twice MongoDB's default
/// `transactionLifetimeLimitSeconds` (60): the server aborts a transaction older than that, and
/// a committed one's changes are all at or before its commit.
pub const MAX_TRANSACTION_SECS: u32 = 120;

/// Remembers the marked transactions the feed is inside: each one's origin and where its
/// marker was.
#[derive(Debug, Default)]
pub struct EchoTagger {
    open: HashMap<TxnId, (Origin, Timestamp)>,
}

impl EchoTagger {
    /// Whether a marked transaction is open: the feed position is no point to resume from.
    pub fn in_marked(&self) -> bool {
        !self.open.is_empty()
    }

    pub fn observe(&mut self, mut record: ChangeRecord) -> Seen {
        if !self.open.is_empty() {
            self.give_up_before(record.cluster_time);
        }
        if record.collection == MARKERS {
            if let Some(txn) = record.txn.clone() {
                match markers::read(record.after.as_ref()) {
                    Read::Closes => {
                        self.open.remove(&txn);
                    }
                    Read::Opens(origin) => {
                        self.open.insert(txn, (origin, record.cluster_time));
                    }
                    Read::Other => {}
                }
            }
            return Seen::Marker;
        }
        if let Some((origin, _)) = record.txn.as_ref().and_then(|t| self.open.get(t)) {
            record.origin = Some(origin.clone());
        }
        Seen::Change(Box::new(record))
    }

    /// Gives up the marked transactions the feed, now at `now`, is too far past to still be in.
    fn give_up_before(&mut self, now: Timestamp) {
        self.open.retain(|txn, (origin, at)| {
            let open = now.time.saturating_sub(at.time) <= MAX_TRANSACTION_SECS;
            if !open {
                tracing::warn!(
                    lsid = %txn.lsid, txn = txn.number, origin = %origin.render(), marker_at = at.time, now = now.time,
                    "a marked transaction never showed its closing marker; no longer treating its changes as echoes"
                );
            }
            open
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Op;
    use bson::{Timestamp, doc};

    fn change(collection: &str, txn: Option<i64>, after: Option<bson::Document>) -> ChangeRecord {
        let mut r = ChangeRecord::snapshot(collection, after.unwrap_or_default(), Timestamp { time: 1, increment: 1 });
        r.op = Op::Update;
        r.txn = txn.map(|n| TxnId { lsid: "{\"id\":1}".into(), number: n });
        r
    }

    fn origin(seen: &Seen) -> Option<Origin> {
        match seen {
            Seen::Change(r) => r.origin.clone(),
            Seen::Marker => panic!("a change"),
        }
    }

    #[test]
    fn the_changes_of_a_marked_transaction_are_echoes_and_only_they() {
        let mut t = EchoTagger::default();
        let marker = doc! { "_id": "reverse/customers_db/0", "origin": { "service": "customers_db", "collection": "customers" } };
        assert_eq!(t.observe(change(MARKERS, Some(7), Some(marker))), Seen::Marker);
        assert!(t.in_marked(), "no checkpoint inside it");
        let echo = Origin { service: "customers_db".into(), collection: Some("customers".into()) };
        assert_eq!(origin(&t.observe(change("customers", Some(7), None))), Some(echo.clone()));
        // An application's own transaction, and a write outside any transaction, are not
        // echoes, even between the marked transaction's changes.
        assert_eq!(origin(&t.observe(change("customers", Some(8), None))), None);
        assert_eq!(origin(&t.observe(change("customers", None, None))), None);
        assert_eq!(origin(&t.observe(change("customers", Some(7), None))), Some(echo), "every change of it");
        // Its closing marker ends it.
        assert_eq!(t.observe(change(MARKERS, Some(7), Some(doc! { "closes": true }))), Seen::Marker);
        assert!(!t.in_marked());
        assert_eq!(origin(&t.observe(change("customers", Some(7), None))), None);
        // A forward write's marker names the service only.
        let forward = doc! { "origin": { "service": "customers_db" } };
        t.observe(change(MARKERS, Some(9), Some(forward)));
        let echo = Origin { service: "customers_db".into(), collection: None };
        assert_eq!(origin(&t.observe(change("customers", Some(9), None))), Some(echo));
        assert_eq!(origin(&t.observe(change("customers", Some(10), None))), None);
    }

    fn at(mut r: ChangeRecord, time: u32) -> ChangeRecord {
        r.cluster_time = Timestamp { time, increment: 1 };
        r
    }

    #[test]
    fn only_the_closing_marker_ends_a_transaction_or_a_feed_long_past_it() {
        // secantusd-rs gives each change of a transaction its own cluster time, and may answer
        // an empty batch between two of them: changes seconds after the marker are still its.
        let mut t = EchoTagger::default();
        let marker = doc! { "origin": { "service": "customers_db", "collection": "customers" } };
        t.observe(at(change(MARKERS, Some(7), Some(marker)), 1000));
        let echo = Origin { service: "customers_db".into(), collection: Some("customers".into()) };
        assert_eq!(origin(&t.observe(at(change("customers", Some(7), None), 1001))), Some(echo.clone()));
        assert_eq!(origin(&t.observe(at(change("customers", None, None), 1030))), None);
        assert_eq!(origin(&t.observe(at(change("customers", Some(7), None), 1000 + MAX_TRANSACTION_SECS))), Some(echo));
        assert!(t.in_marked(), "still inside it: no checkpoint");
        // Its closing marker never came (a ficus without them applied it): given up, the feed
        // checkpoints again, and the transaction's number means nothing any more.
        assert_eq!(origin(&t.observe(at(change("customers", Some(7), None), 1001 + MAX_TRANSACTION_SECS))), None);
        assert!(!t.in_marked());
    }
}
