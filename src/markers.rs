//! The `_ficus_applied` marker protocol, in one place: the documents ficus writes into a
//! database's marker collection, and what a tail reads back from them.
//!
//! Every database ficus writes (the service databases, and the monolith once services write
//! back) has the collection. Four writers use it, each with its own document:
//! - a batch's **opening** marker, one per partition it read, first in its transaction: whose
//!   write the transaction is (`origin`), so the database's tail tags its changes as echoes;
//! - the batch's **closing** marker, last in the transaction: the transaction is over (other
//!   writers' changes may come between a transaction's changes on some servers);
//! - the cutover's **fence** marker, outside any transaction: the drain point of a move, which
//!   the tail checkpoints past once everything before it is acknowledged;
//! - the reverse tail's **release** marker: a service back at 0% whose reverse tail stops.
//!
//! Builders and the reader are pure; the writes stay with their owners (the sink, the cutover's
//! steps, the reverse tail), which take the documents from here.

use bson::{Bson, Document, doc};

use crate::event::Origin;

/// The collection, in every database ficus writes, where each applied batch leaves its marker,
/// inside the batch's transaction: a change committed in a transaction that wrote a marker is
/// ficus's own write.
pub const COLLECTION: &str = "_ficus_applied";

/// A marker as a tail reads it back.
#[derive(Debug, Clone, PartialEq)]
pub enum Read {
    /// A batch's opening marker: the transaction's changes are `origin`'s writes.
    Opens(Origin),
    /// A batch's closing marker: its transaction is over.
    Closes,
    /// Any other marker (fence, release): bookkeeping, no transaction to track.
    Other,
}

/// `_id` and document of a batch's opening marker for one partition it read (replaced whole, so
/// the change event carries it as written).
pub fn opening(origin: &Origin, topic: &str, partition: i32, offset: i64) -> (String, Document) {
    let id = format!("{}/{topic}/{partition}", origin.render());
    let named = match &origin.collection {
        Some(c) => doc! { "service": &origin.service, "collection": c },
        None => doc! { "service": &origin.service },
    };
    let marker = doc! { "_id": &id, "origin": named, "offset": offset, "at": bson::DateTime::now() };
    (id, marker)
}

/// `_id` and document of a batch's closing marker; `at` names the batch's first partition
/// (`topic/partition`), so concurrent members of a group never write the same one.
pub fn closing(origin: &Origin, at: &str) -> (String, Document) {
    let id = format!("{}/{at}/close", origin.render());
    let marker = doc! { "_id": &id, "closes": true, "at": bson::DateTime::now() };
    (id, marker)
}

/// `_id` and update of a move's fence marker on the losing side.
pub fn fence(service: &str, from: u8, to: u8) -> (String, Document) {
    let update =
        doc! { "$set": { "fence": { "from": i32::from(from), "to": i32::from(to) }, "at": bson::DateTime::now() } };
    (format!("{service}/fence"), update)
}

/// `_id` and update of the marker a service's reverse tail writes when the service is back at
/// 0% at `epoch` (its own change moves the tail's checkpoint past the release).
pub fn released(service: &str, epoch: i64) -> (String, Document) {
    let update = doc! { "$set": {
        "origin": { "service": service, "collection": "(released)" }, "epoch": epoch, "at": bson::DateTime::now(),
    } };
    (format!("{service}/released"), update)
}

/// What a marker document (a change's after-image) says. A closing marker is recognised first;
/// an opening one by its `origin`; anything else is bookkeeping.
pub fn read(marker: Option<&Document>) -> Read {
    let Some(m) = marker else { return Read::Other };
    if m.get_bool("closes").unwrap_or(false) {
        return Read::Closes;
    }
    match origin_of(m) {
        Some(o) => Read::Opens(o),
        None => Read::Other,
    }
}

/// The origin an opening marker names: `{ origin: { service, collection } }`.
fn origin_of(marker: &Document) -> Option<Origin> {
    let o = marker.get_document("origin").ok()?;
    let service = o.get_str("service").ok()?.to_string();
    let collection = match o.get("collection") {
        Some(Bson::String(c)) => Some(c.clone()),
        _ => None,
    };
    Some(Origin { service, collection })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(collection: Option<&str>) -> Origin {
        Origin { service: "customers_db".into(), collection: collection.map(String::from) }
    }

    #[test]
    fn an_opening_marker_reads_back_as_its_origin() {
        for o in [origin(None), origin(Some("customers"))] {
            let (id, m) = opening(&o, "linechatbot.customers", 3, 42);
            assert_eq!(id, format!("{}/linechatbot.customers/3", o.render()));
            assert_eq!(m.get_str("_id").unwrap(), id);
            assert_eq!(m.get_i64("offset").unwrap(), 42);
            assert_eq!(read(Some(&m)), Read::Opens(o));
        }
    }

    #[test]
    fn a_closing_marker_reads_back_as_the_end_of_its_transaction() {
        let (id, m) = closing(&origin(Some("customers")), "linechatbot.customers/3");
        assert_eq!(id, "customers_db/customers/linechatbot.customers/3/close");
        assert_eq!(read(Some(&m)), Read::Closes);
    }

    #[test]
    fn fence_and_release_markers_are_bookkeeping() {
        let (id, update) = fence("customers_db", 10, 50);
        assert_eq!(id, "customers_db/fence");
        let set = update.get_document("$set").unwrap();
        assert_eq!(set.get_document("fence").unwrap(), &doc! { "from": 10, "to": 50 });
        assert_eq!(read(Some(set)), Read::Other);
        let (id, update) = released("customers_db", 7);
        assert_eq!(id, "customers_db/released");
        assert_eq!(update.get_document("$set").unwrap().get_i64("epoch").unwrap(), 7);
        // The release names an origin of its own: it is no transaction's opening, but reading it
        // as one is harmless (it is written outside any transaction, so nothing is tagged).
        assert!(matches!(read(Some(update.get_document("$set").unwrap())), Read::Opens(_)));
        assert_eq!(read(None), Read::Other);
    }
}
