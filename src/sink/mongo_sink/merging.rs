//! Merges into documents a side owns (a non-owner's, late or re-driven change, field by field
//! against its own pre-image, conflicts recorded in the outbox), and the witness of an echo of
//! the service's own write-back.

use bson::{Bson, Document, doc};
use mongodb::ClientSession;

use super::MongoSink;
use crate::event::Version;
use crate::mongo;
use crate::sink::conflicts::{ConflictRecord, Outbox, Side, SideState};
use crate::sink::{MERGED, META, SinkError, TOMBSTONES, Versioned, doc_key};
use crate::transform::{Base, Why};

/// A merge into an owned document, as a [`WriteOp::Merge`] carries it.
pub(super) struct Merge<'a> {
    pub(super) collection: &'a str,
    pub(super) id: &'a Bson,
    pub(super) doc: Option<&'a Document>,
    pub(super) base: &'a Base,
    pub(super) why: Why,
    pub(super) arrays: &'a [(String, Option<String>)],
}

impl MongoSink {
    /// Merges a monolith change into a document the service owns (see [`super::merge`]), in the
    /// batch's transaction (or one of its own): reads the owner's document, writes the merge
    /// and records any conflict in the outbox, all or nothing. Version-guarded like an upsert:
    /// a change already merged (or older than the document, or than its tombstone) does
    /// nothing, so redelivery neither merges twice nor reports twice. The owner's application
    /// writes the document plain (its `_ficus` dropped or stale), so the guard is the newer of
    /// the document's `_ficus.v` and its record in `_ficus_merged`: a redelivered merge must
    /// not take back a field the owner has since set to the value it had before.
    pub(super) async fn merge(
        &self,
        s: &mut ClientSession,
        txn: bool,
        v: &Versioned,
        m: &Merge<'_>,
    ) -> Result<(), SinkError> {
        if txn {
            return self.merging(s, v, m).await;
        }
        let mut attempts = 0;
        loop {
            mongo::begin(s).await?;
            let outcome = self.merging(s, v, m).await;
            if let Some(done) = mongo::finish(s, outcome, &mut attempts, SinkError::is_conflict).await {
                return done;
            }
        }
    }

    pub(super) async fn merging(&self, s: &mut ClientSession, v: &Versioned, m: &Merge<'_>) -> Result<(), SinkError> {
        let coll = self.db.collection::<Document>(m.collection);
        let ledger = self.db.collection::<Document>(MERGED);
        let key = doc_key(m.collection, m.id);
        let current = coll.find_one(doc! { "_id": m.id.clone() }).session(&mut *s).await?;
        let in_doc = current.as_ref().and_then(|d| d.get_document(META).ok()?.get_str("v").ok().map(str::to_string));
        let merged_at = ledger.find_one(doc! { "_id": &key }).session(&mut *s).await?;
        let in_ledger = merged_at.and_then(|d| d.get_str("v").ok().map(str::to_string));
        let held = in_doc.map(|h| Version::stored(&h)).max(in_ledger.map(|h| Version::stored(&h)));
        let newer_held = held.as_ref().is_some_and(|h| v.version.held_by(h.as_str()));
        // Merged already, or older than what the document holds; a dead letter re-driven is
        // merged all the same (its own fields land, the newer values stand).
        if newer_held && !v.redriven {
            return Ok(());
        }
        if current.is_none() {
            let tombs = self.tombstones(s, m.collection, std::iter::once(m.id)).await?;
            if tombs.get(&key).is_some_and(|t| v.version.held_by(t)) {
                return Ok(());
            }
        }
        ledger
            .update_one(
                doc! { "_id": &key },
                doc! { "$max": { "v": v.version.as_str() }, "$set": { "c": m.collection, "id": m.id.clone() } },
            )
            .upsert(true)
            .session(&mut *s)
            .await?;
        let merged = crate::sink::merge::merge(current.as_ref(), m.base, m.doc, m.arrays);
        let meta = match (&current, newer_held) {
            // Never moves the document's version back.
            (Some(c), true) => c.get_document(META).ok().cloned().unwrap_or_else(|| Self::meta(v)),
            _ => Self::meta(v),
        };
        match (merged.write, &current) {
            (Some(mut w), _) => {
                w.insert("_id", m.id.clone());
                w.insert(META, meta);
                coll.replace_one(doc! { "_id": m.id.clone() }, w).upsert(true).session(&mut *s).await?;
            }
            // Nothing taken, but the change is merged: the version says so.
            (None, Some(_)) if !newer_held => {
                coll.update_one(doc! { "_id": m.id.clone() }, doc! { "$set": { META: meta } }).session(&mut *s).await?;
            }
            (None, _) => {}
        }
        // A fence violation is reported whether or not a field met the owner's.
        let why = if newer_held { Why::Redriven } else { m.why };
        if !merged.conflicts.is_empty() || why == Why::FenceViolation {
            let reason = (why == Why::FenceViolation).then(|| {
                "fence violation: the monolith wrote a fenced key after the drain point; merged, not lost".to_string()
            });
            let record = ConflictRecord {
                service: self.db.name().to_string(),
                side: Side::Monolith,
                collection: m.collection.to_string(),
                id: m.id.clone(),
                event: v.event_id.clone(),
                fields: merged.conflicts,
                owner: SideState { version: held.map(|h| h.to_string()), document: current },
                other: SideState { version: Some(v.version.to_string()), document: m.doc.cloned() },
                reason,
                why: Some(why),
            };
            Outbox::new(&self.db).record(s, &record).await?;
        }
        Ok(())
    }

    /// Records the version of the echo of the service's own write-back beside its document (a
    /// tombstone for a delete, `_ficus_merged` otherwise), never moving either back.
    pub(super) async fn witness(
        &self,
        s: &mut ClientSession,
        v: &Versioned,
        collection: &str,
        id: &Bson,
        deleted: bool,
    ) -> Result<(), SinkError> {
        let key = doc_key(collection, id);
        let (coll, mut set) = if deleted {
            (TOMBSTONES, doc! { "c": collection, "id": id.clone(), "at": bson::DateTime::now() })
        } else {
            (MERGED, doc! { "c": collection, "id": id.clone() })
        };
        set.insert("witnessed", true);
        self.db
            .collection::<Document>(coll)
            .update_one(doc! { "_id": &key }, doc! { "$max": { "v": v.version.as_str() }, "$set": set })
            .upsert(true)
            .session(&mut *s)
            .await?;
        Ok(())
    }
}
