//! What a batch of write-backs does to the monolith, before it is sent: the writes in order
//! ([`MonolithOp`]) and the monolith documents the batch has read or written as it leaves them so
//! far ([`Touched`]), each found by a filter in constant time.

use std::collections::{HashMap, HashSet};

use bson::{Bson, Document, doc};
use mongodb::ClientSession;

use super::super::SinkError;
use crate::event::mapping::get_path;
use crate::event::render_key;
use crate::transform::Patch;

/// One write to the monolith, in batch order.
pub(super) enum MonolithOp {
    /// `_id` and the update (`$set`/`$unset`).
    Update(Bson, Document),
    Insert(Document),
    /// `_id`.
    Delete(Bson),
}

impl MonolithOp {
    /// The write command it goes in, that command's list field, and its entry there.
    pub(super) fn statement(&self) -> (&'static str, &'static str, Document) {
        match self {
            MonolithOp::Update(id, u) => ("update", "updates", doc! { "q": { "_id": id.clone() }, "u": u.clone() }),
            MonolithOp::Insert(d) => ("insert", "documents", d.clone()),
            MonolithOp::Delete(id) => ("delete", "deletes", doc! { "q": { "_id": id.clone() }, "limit": 1 }),
        }
    }
}

/// The monolith documents a batch has read or written, as the batch leaves them so far, each
/// found by a filter in constant time (a batch looks up every one of its documents).
#[derive(Default)]
pub(super) struct Touched {
    /// One slot per document; emptied when the batch deletes it.
    docs: Vec<Option<Document>>,
    /// Per field path looked up by: the value's rendering → the slots holding it (a bucket;
    /// candidates are compared exactly).
    by: HashMap<String, HashMap<String, Vec<usize>>>,
    /// `_id`s the batch wrote (their documents here differ from the database's).
    written: HashSet<String>,
    /// `_id`s the batch deleted.
    gone: HashSet<String>,
}

impl Touched {
    /// Documents read for the batch (a document read twice is kept once).
    pub(super) fn load(&mut self, found: Vec<Document>) {
        for d in found {
            if self.slot_of_id(d.get("_id")).is_none() {
                self.add(d);
            }
        }
    }

    pub(super) fn doc(&self, slot: usize) -> &Document {
        self.docs[slot].as_ref().expect("a slot handed out holds its document")
    }

    /// The slot of the document a filter of plain values finds: among those read or written,
    /// else looked up alone (and remembered), never one the batch deleted.
    pub(super) async fn lookup(
        &mut self,
        coll: &mongodb::Collection<Document>,
        s: &mut ClientSession,
        filter: &Document,
    ) -> Result<Option<usize>, SinkError> {
        if let Some(slot) = self.find(filter) {
            return Ok(Some(slot));
        }
        let Some(found) = coll.find_one(filter.clone()).session(&mut *s).await? else { return Ok(None) };
        let id = found.get("_id").map(render_key).unwrap_or_default();
        if self.gone.contains(&id) {
            return Ok(None);
        }
        if let Some(known) = self.slot_of_id(found.get("_id")) {
            // Read already and unchanged: the server matched what a plain comparison did not
            // (an int against a long, say). Changed by the batch: as it is now, it does not.
            return Ok((!self.written.contains(&id)).then_some(known));
        }
        Ok(Some(self.add(found)))
    }

    /// Among the documents held, the first that has every field of `filter`.
    pub(super) fn find(&mut self, filter: &Document) -> Option<usize> {
        let (field, value) = filter.iter().next()?;
        self.index(field);
        let slots = self.by[field].get(&render_key(value))?;
        slots.iter().copied().find(|&i| self.docs[i].as_ref().is_some_and(|d| matches(d, filter)))
    }

    pub(super) fn slot_of_id(&mut self, id: Option<&Bson>) -> Option<usize> {
        self.find(&doc! { "_id": id?.clone() })
    }

    /// Builds the index by one field path, on first use.
    pub(super) fn index(&mut self, field: &str) {
        if !self.by.contains_key(field) {
            let mut index: HashMap<String, Vec<usize>> = HashMap::new();
            for (i, d) in self.docs.iter().enumerate() {
                if let Some(v) = d.as_ref().and_then(|d| get_path(d, field)) {
                    index.entry(render_key(v)).or_default().push(i);
                }
            }
            self.by.insert(field.to_string(), index);
        }
    }

    pub(super) fn add(&mut self, doc: Document) -> usize {
        self.docs.push(Some(doc));
        let slot = self.docs.len() - 1;
        self.reindex(slot);
        slot
    }

    /// Puts a document into the indexes (after it changed).
    pub(super) fn reindex(&mut self, slot: usize) {
        let Some(doc) = &self.docs[slot] else { return };
        for (field, index) in &mut self.by {
            if let Some(v) = get_path(doc, field) {
                index.entry(render_key(v)).or_default().push(slot);
            }
        }
    }

    /// Takes a document out of the indexes (before it changes or goes).
    pub(super) fn unindex(&mut self, slot: usize) {
        let Some(doc) = &self.docs[slot] else { return };
        for (field, index) in &mut self.by {
            if let Some(slots) = get_path(doc, field).and_then(|v| index.get_mut(&render_key(v))) {
                slots.retain(|&i| i != slot);
            }
        }
    }

    /// Applies a patch to a held document, in place.
    pub(super) fn patch(&mut self, slot: usize, patch: &Patch) -> Result<(), SinkError> {
        self.unindex(slot);
        let doc = self.docs[slot].as_mut().expect("a slot handed out holds its document");
        let applied = patch.apply_to(doc);
        self.written.insert(doc.get("_id").map(render_key).unwrap_or_default());
        self.reindex(slot);
        Ok(applied?)
    }

    /// Remembers a document the batch wrote whole (an insert, a patched one).
    pub(super) fn insert(&mut self, doc: Document) {
        let id = doc.get("_id").map(render_key).unwrap_or_default();
        if let Some(old) = self.slot_of_id(doc.get("_id")) {
            self.unindex(old);
            self.docs[old] = None;
        }
        self.gone.remove(&id);
        self.written.insert(id);
        self.add(doc);
    }

    pub(super) fn delete(&mut self, slot: usize) {
        let id = self.doc(slot).get("_id").map(render_key).unwrap_or_default();
        self.unindex(slot);
        self.docs[slot] = None;
        self.gone.insert(id);
    }
}

/// Whether a document has every field of a filter of plain values (dotted paths).
pub(super) fn matches(doc: &Document, filter: &Document) -> bool {
    filter.iter().all(|(path, value)| get_path(doc, path) == Some(value))
}

/// Every document a filter finds, inside the session.
pub(super) async fn find_all(
    coll: &mongodb::Collection<Document>,
    s: &mut ClientSession,
    filter: Document,
) -> Result<Vec<Document>, SinkError> {
    use futures::TryStreamExt;
    Ok(coll.find(filter).session(&mut *s).await?.stream(&mut *s).try_collect().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customer(id: i32, user: &str) -> Document {
        doc! { "_id": id, "user_id": user, "name": format!("name of {user}") }
    }

    #[test]
    fn documents_are_found_by_any_field_as_the_batch_leaves_them() {
        let mut t = Touched::default();
        t.load(vec![customer(1, "U1"), customer(2, "U2"), customer(1, "U1")]);
        assert_eq!(t.docs.len(), 2, "a document read twice is held once");
        let by_user = |t: &mut Touched, u: &str| t.find(&doc! { "user_id": u });
        let one = by_user(&mut t, "U1").expect("found by a field never looked up before");
        assert_eq!(t.find(&doc! { "_id": 1 }), Some(one));
        assert_eq!(t.find(&doc! { "_id": 1i64 }), None, "a plain comparison: the database is asked");

        // A patch that changes the key: found by the new value only, and marked written.
        let patch = Patch { set: doc! { "user_id": "U1-renamed" }, ..Patch::default() };
        t.patch(one, &patch).unwrap();
        assert_eq!(by_user(&mut t, "U1"), None);
        assert_eq!(by_user(&mut t, "U1-renamed"), Some(one));
        assert_eq!(t.doc(one).get_str("name").unwrap(), "name of U1");
        assert!(t.written.contains(&render_key(&Bson::Int32(1))));

        // Deleted: gone from every index; inserted again: found again.
        let two = by_user(&mut t, "U2").unwrap();
        t.delete(two);
        assert_eq!(by_user(&mut t, "U2"), None);
        assert_eq!(t.find(&doc! { "_id": 2 }), None);
        assert!(t.gone.contains(&render_key(&Bson::Int32(2))));
        t.insert(customer(2, "U2"));
        assert!(by_user(&mut t, "U2").is_some());
        assert!(!t.gone.contains(&render_key(&Bson::Int32(2))));

        // Two documents sharing a rendering ("3" and 3) are told apart by an exact comparison.
        t.insert(doc! { "_id": "3", "user_id": "U3s" });
        t.insert(doc! { "_id": 3, "user_id": "U3i" });
        let s = t.find(&doc! { "_id": "3" }).unwrap();
        let i = t.find(&doc! { "_id": 3 }).unwrap();
        assert_ne!(s, i);
        assert_eq!(t.doc(i).get_str("user_id").unwrap(), "U3i");
    }
}
