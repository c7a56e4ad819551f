//! The monolith as a sink: reverse sync writes a service's own changes back, through the
//! reverses of the service's transforms, as field-scoped patches.
//!
//! Each batch is one transaction per service collection that first writes its apply marker,
//! naming the service and that collection (see `tail::echo`), so the monolith's tail tags the
//! changes it causes as their echo: the service's forward consumer skips them for that
//! collection, and every other target reads them as it would any monolith change.
//!
//! Per service document, the monolith keeps (in `_ficus_reverse`) the version of the last
//! change written back, on the service database's clock, and the monolith `_id` it went to.
//! The version guards like the forward sink's: a change at or below it is a no-op, so
//! duplicates, replays and redelivery never regress a monolith document, and a version from
//! the service's clock is only ever compared with another from the same clock. The `_id` links a
//! document the service created to the monolith document created for it, so its later changes
//! find it; a delete keeps the record (with its version) as a tombstone.
//!
//! The monolith's documents carry nothing of ficus's: only the fields the transform reads are
//! ever written, and only those the service changed ([`crate::transform::Reverse::rebase`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bson::{Bson, Document, doc, oid::ObjectId};
use mongodb::options::{Acknowledgment, WriteConcern};
use mongodb::{Client, ClientSession, Database};

use super::conflicts::{ConflictRecord, Outbox, Side, SideState};
use super::merge::FieldConflict;
use super::{Marker, Sink, SinkError, Versioned, doc_key};
use crate::event::{EventData, Op, Origin};
use crate::mongo;
use crate::transform::{Patch, ServiceTransforms, WriteOp};

/// Per service document written back: its version and its monolith `_id`.
pub const REVERSE_STATE: &str = "_ficus_reverse";

/// Writes one service's changes back into the monolith database.
#[derive(Clone)]
pub struct MonolithSink {
    client: Client,
    db: Database,
    transforms: Arc<ServiceTransforms>,
}

impl MonolithSink {
    pub fn new(client: Client, database: &str, transforms: Arc<ServiceTransforms>) -> Self {
        let wc = WriteConcern::builder().w(Acknowledgment::Majority).journal(true).build();
        let db = client
            .database_with_options(database, mongodb::options::DatabaseOptions::builder().write_concern(wc).build());
        MonolithSink { client, db, transforms }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    fn service(&self) -> &str {
        self.transforms.service()
    }

    /// The key of a service document's state.
    fn state_key(&self, collection: &str, id: &Bson) -> String {
        format!("{}/{}", self.service(), doc_key(collection, id))
    }

    /// One collection's write-backs, in batch order, as one marked transaction.
    async fn apply_collection(
        &self,
        collection: &str,
        writes: &[(&Versioned, &EventData)],
        positions: &[(String, i32, i64)],
    ) -> Result<(), SinkError> {
        let marker = Marker {
            origin: Origin { service: self.service().to_string(), collection: Some(collection.to_string()) },
            positions: positions.to_vec(),
            echoes: 0,
        };
        let mut s = self.client.start_session().await?;
        let mut attempts = 0;
        loop {
            mongo::begin(&mut s).await?;
            let outcome = async {
                marker.write(&self.db, &mut s).await?;
                self.write_back(&mut s, collection, writes).await?;
                marker.close(&self.db, &mut s).await
            }
            .await;
            if let Some(done) = mongo::finish(&mut s, outcome, &mut attempts, SinkError::is_conflict).await {
                return done;
            }
        }
    }

    /// Writes a batch of one collection's changes back, in order (see the module header), in
    /// a handful of round trips: the batch's states and the monolith documents they lead to
    /// are read with one `$in` query each, every change is worked out in memory over the
    /// documents as the batch leaves them (a document changed twice sees its first patch),
    /// and the writes go out as ordered bulk commands. A document the reads did not bring (a
    /// new one, or one found by a key the batch changed) is looked up alone.
    async fn write_back(
        &self,
        s: &mut ClientSession,
        collection: &str,
        writes: &[(&Versioned, &EventData)],
    ) -> Result<(), SinkError> {
        let Some(reverse) = self.transforms.reverse_for(collection) else {
            return Err(SinkError::Unsupported(format!("{collection} of {} is not written back", self.service())));
        };
        let source = reverse.source_collection().to_string();
        let states_coll = self.db.collection::<Document>(REVERSE_STATE);
        let monolith = self.db.collection::<Document>(&source);

        // The states of the batch's documents.
        let keys: Vec<String> = writes.iter().map(|(_, c)| self.state_key(collection, &c.document_id)).collect();
        let mut states: HashMap<String, Document> = HashMap::new();
        for d in find_all(&states_coll, s, doc! { "_id": { "$in": &keys } }).await? {
            if let Ok(k) = d.get_str("_id") {
                states.insert(k.to_string(), d.clone());
            }
        }
        // The monolith documents, by the filter each change finds its document with.
        let filter_of = |state: Option<&Document>, change: &EventData| -> Result<Option<Document>, SinkError> {
            let linked = state.and_then(|d| d.get("m")).filter(|m| !matches!(m, Bson::Null)).cloned();
            Ok(match (linked, change.after.as_ref().or(change.before.as_ref())) {
                (Some(id), _) => Some(doc! { "_id": id }),
                (None, Some(image)) => Some(reverse.locate(image)?),
                (None, None) => None,
            })
        };
        let mut wanted: BTreeMap<String, Vec<Bson>> = BTreeMap::new();
        for ((_, change), key) in writes.iter().zip(&keys) {
            if let Some(f) = filter_of(states.get(key), change)? {
                for (field, value) in f {
                    wanted.entry(field).or_default().push(value);
                }
            }
        }
        let mut touched = Touched::default();
        for (field, values) in wanted {
            touched.docs.extend(find_all(&monolith, s, doc! { field: { "$in": values } }).await?);
        }

        let mut ops: Vec<MonolithOp> = Vec::new();
        let mut records: Vec<(String, Document)> = Vec::new();
        for ((v, change), key) in writes.iter().zip(keys) {
            if states.get(&key).and_then(|d| d.get_str("v").ok()).is_some_and(|held| held >= v.version.as_str()) {
                continue; // written back already, or older than what was
            }
            let current = match filter_of(states.get(&key), change)? {
                Some(f) => touched.lookup(&monolith, s, &f).await?,
                None => None,
            };
            let mut record = doc! { "v": v.version.as_str(), "c": collection, "id": change.document_id.clone() };
            if change.op == Op::Delete {
                if let Some(id) = current.as_ref().and_then(|d| d.get("_id")).cloned() {
                    touched.delete(&id);
                    ops.push(MonolithOp::Delete(id.clone()));
                    record.insert("m", id);
                }
                record.insert("deleted", true);
            } else {
                // Nothing to say: an update read after its document was deleted, of a document
                // the monolith does not have either (its delete follows).
                let Some(service) = reverse.rebase(current.as_ref(), change) else { continue };
                let patch = reverse.put(current.as_ref(), &service)?;
                let id = match &current {
                    Some(d) => {
                        let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                        if !patch.set.is_empty() || !patch.unset.is_empty() {
                            let mut now = d.clone();
                            patch.apply_to(&mut now)?;
                            touched.put(now);
                            ops.push(MonolithOp::Update(id.clone(), patch.to_update()));
                        }
                        id
                    }
                    None => {
                        let id = reverse.insert_id(&service).unwrap_or_else(|| Bson::ObjectId(ObjectId::new()));
                        let mut created = doc! { "_id": id.clone() };
                        patch.apply_to(&mut created)?;
                        touched.put(created.clone());
                        ops.push(MonolithOp::Insert(created));
                        id
                    }
                };
                record.insert("m", id);
                record.insert("deleted", false);
                if patch.has_issues() {
                    self.record_issues(s, v, &source, &patch, &service, current.as_ref()).await?;
                }
            }
            let mut state = record.clone();
            state.insert("_id", key.clone());
            states.insert(key.clone(), state);
            records.push((key, record));
        }

        // The monolith's writes in batch order, consecutive ones of a kind in one command.
        let mut run: Option<(&str, &str, Vec<Document>)> = None;
        for (command, field, entry) in ops.iter().map(MonolithOp::statement) {
            match &mut run {
                Some((c, _, entries)) if *c == command => entries.push(entry),
                _ => {
                    if let Some((c, f, entries)) = run.replace((command, field, vec![entry])) {
                        self.run(s, &source, doc! { c: &source, f: entries, "ordered": true }).await?;
                    }
                }
            }
        }
        if let Some((c, f, entries)) = run {
            self.run(s, &source, doc! { c: &source, f: entries, "ordered": true }).await?;
        }
        if !records.is_empty() {
            let updates: Vec<Document> = records
                .into_iter()
                .map(|(key, record)| doc! { "q": { "_id": key }, "u": { "$set": record }, "upsert": true })
                .collect();
            self.run(s, REVERSE_STATE, doc! { "update": REVERSE_STATE, "updates": updates, "ordered": true }).await?;
        }
        Ok(())
    }

    /// Runs a write command inside the batch's transaction (its commit carries the write
    /// concern); a write error fails the batch.
    async fn run(&self, s: &mut ClientSession, collection: &str, command: Document) -> Result<(), SinkError> {
        let reply = self.db.run_command(command).session(&mut *s).await?;
        if let Some(e) = reply.get_array("writeErrors").ok().and_then(|e| e.iter().find_map(Bson::as_document)) {
            let code = e.get_i32("code").unwrap_or(0);
            let message = e.get_str("errmsg").unwrap_or("").to_string();
            return Err(SinkError::Write { collection: collection.to_string(), code, message });
        }
        Ok(())
    }

    /// Records what a write-back could not carry (read-only fields the service holds
    /// differently, fields that disagree) as a conflict on the service's side.
    async fn record_issues(
        &self,
        s: &mut ClientSession,
        v: &Versioned,
        monolith_collection: &str,
        patch: &Patch,
        service: &Document,
        monolith: Option<&Document>,
    ) -> Result<(), SinkError> {
        let mut fields: Vec<FieldConflict> = patch
            .conflicts
            .iter()
            .map(|c| FieldConflict {
                path: c.field.clone(),
                owner: c.service.clone(),
                other: c.monolith.clone(),
                base: None,
            })
            .collect();
        let mut reasons: Vec<String> = patch.conflicts.iter().map(|c| format!("{}: {}", c.field, c.reason)).collect();
        for d in &patch.disagreements {
            let values: Vec<String> =
                d.fields.iter().map(|(f, v)| format!("{f} = {}", v.clone().unwrap_or(Bson::Null))).collect();
            reasons.push(format!(
                "{}: fields written from it disagree ({}); nothing written there",
                d.path,
                values.join(", ")
            ));
            fields.push(FieldConflict {
                path: d.path.clone(),
                owner: d.fields.first().and_then(|(_, v)| v.clone()),
                other: monolith.and_then(|m| crate::event::mapping::get_path(m, &d.path)).cloned(),
                base: None,
            });
        }
        let record = ConflictRecord {
            service: self.service().to_string(),
            side: Side::Service,
            collection: monolith_collection.to_string(),
            id: monolith.and_then(|m| m.get("_id")).cloned().unwrap_or(Bson::Null),
            event: v.event_id.clone(),
            fields,
            owner: SideState { version: Some(v.version.to_string()), document: Some(service.clone()) },
            other: SideState { version: None, document: monolith.cloned() },
            reason: Some(reasons.join("; ")),
        };
        Outbox::new(&self.db).record(s, &record).await?;
        Ok(())
    }
}

impl Sink for MonolithSink {
    /// Contract as [`Sink`]'s; the batch is one transaction per service collection, each with
    /// its marker (the marker's origin names the collection, whatever `marker` says; its
    /// positions are `marker`'s).
    async fn apply(&self, batch: &[Versioned], marker: Option<&Marker>) -> Result<(), SinkError> {
        let mut by_collection: Vec<(&str, Vec<(&Versioned, &EventData)>)> = Vec::new();
        for v in batch {
            for op in &v.ops {
                let WriteOp::WriteBack { collection, change } = op else {
                    return Err(SinkError::Unsupported(format!("{} reached the monolith's sink", op.collection())));
                };
                match by_collection.iter_mut().find(|(c, _)| c == collection) {
                    Some((_, writes)) => writes.push((v, change)),
                    None => by_collection.push((collection, vec![(v, change)])),
                }
            }
        }
        let positions = match marker {
            Some(m) if !m.positions.is_empty() => m.positions.clone(),
            _ => vec![("direct".to_string(), 0, 0)],
        };
        for (collection, writes) in &by_collection {
            self.apply_collection(collection, writes, &positions).await?;
        }
        Ok(())
    }
}

/// One write to the monolith, in batch order.
enum MonolithOp {
    /// `_id` and the update (`$set`/`$unset`).
    Update(Bson, Document),
    Insert(Document),
    /// `_id`.
    Delete(Bson),
}

impl MonolithOp {
    /// The write command it goes in, that command's list field, and its entry there.
    fn statement(&self) -> (&'static str, &'static str, Document) {
        match self {
            MonolithOp::Update(id, u) => ("update", "updates", doc! { "q": { "_id": id.clone() }, "u": u.clone() }),
            MonolithOp::Insert(d) => ("insert", "documents", d.clone()),
            MonolithOp::Delete(id) => ("delete", "deletes", doc! { "q": { "_id": id.clone() }, "limit": 1 }),
        }
    }
}

/// The monolith documents a batch has read or written, as the batch leaves them so far.
#[derive(Default)]
struct Touched {
    docs: Vec<Document>,
    /// `_id`s the batch wrote (their documents here differ from the database's).
    written: Vec<Bson>,
    /// `_id`s the batch deleted.
    gone: Vec<Bson>,
}

impl Touched {
    /// The document a single-field filter finds: among those read or written, else looked up
    /// alone (and remembered), never one the batch deleted.
    async fn lookup(
        &mut self,
        coll: &mongodb::Collection<Document>,
        s: &mut ClientSession,
        filter: &Document,
    ) -> Result<Option<Document>, SinkError> {
        if let Some(d) = self.docs.iter().find(|d| matches(d, filter)) {
            return Ok(Some(d.clone()));
        }
        let Some(found) = coll.find_one(filter.clone()).session(&mut *s).await? else { return Ok(None) };
        let id = found.get("_id").cloned().unwrap_or(Bson::Null);
        if self.gone.contains(&id) {
            return Ok(None);
        }
        if let Some(known) = self.docs.iter().find(|d| d.get("_id") == Some(&id)) {
            // Read already and unchanged: the server matched what a plain comparison did not
            // (an int against a long, say). Changed by the batch: as it is now, it does not.
            return Ok((!self.written.contains(&id)).then(|| known.clone()));
        }
        self.docs.push(found.clone());
        Ok(Some(found))
    }

    /// Remembers a document's new state.
    fn put(&mut self, doc: Document) {
        let id = doc.get("_id").cloned();
        self.gone.retain(|g| Some(g) != id.as_ref());
        self.written.extend(id.clone());
        match self.docs.iter_mut().find(|d| d.get("_id") == id.as_ref()) {
            Some(d) => *d = doc,
            None => self.docs.push(doc),
        }
    }

    fn delete(&mut self, id: &Bson) {
        self.docs.retain(|d| d.get("_id") != Some(id));
        self.gone.push(id.clone());
    }
}

/// Whether a document has every field of a filter of plain values (dotted paths).
fn matches(doc: &Document, filter: &Document) -> bool {
    filter.iter().all(|(path, value)| crate::event::mapping::get_path(doc, path) == Some(value))
}

/// Every document a filter finds, inside the session.
async fn find_all(
    coll: &mongodb::Collection<Document>,
    s: &mut ClientSession,
    filter: Document,
) -> Result<Vec<Document>, SinkError> {
    use futures::TryStreamExt;
    Ok(coll.find(filter).session(&mut *s).await?.stream(&mut *s).try_collect().await?)
}
