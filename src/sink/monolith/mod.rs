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

mod batch;

use self::batch::{MonolithOp, Touched, find_all};
use super::conflicts::{ConflictRecord, Outbox, Side, SideState};
use super::merge::FieldConflict;
use super::{Marker, Sink, SinkError, Versioned, doc_key};
use crate::event::mapping::get_path;
use crate::event::{EventData, Op, Origin};
use crate::mongo;
use crate::transform::{Apply, Base, Patch, Reverse, ServiceTransforms, Why, WriteBack};

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
        writes: &[WriteBackOf<'_>],
        judged: &Marker,
    ) -> Result<(), SinkError> {
        let marker = Marker {
            origin: Origin { service: self.service().to_string(), collection: Some(collection.to_string()) },
            positions: judged.positions.clone(),
            echoes: 0,
            judged: judged.judged.clone(),
        };
        let mut s = self.client.start_session().await?;
        let mut attempts = 0;
        loop {
            mongo::begin(&mut s).await?;
            let outcome = async {
                judged.still_judged()?;
                marker.write(&self.db, &mut s).await?;
                self.write_back(&mut s, collection, writes).await?;
                judged.still_judged()?;
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
        writes: &[WriteBackOf<'_>],
    ) -> Result<(), SinkError> {
        let Some(reverse) = self.transforms.reverse_for(collection) else {
            return Err(SinkError::Unsupported(format!("{collection} of {} is not written back", self.service())));
        };
        let source = reverse.source_collection().to_string();
        let monolith = self.db.collection::<Document>(&source);
        let keys: Vec<String> = writes.iter().map(|w| self.state_key(collection, &w.change.document_id)).collect();
        let (mut states, mut touched) = self.read_batch(s, &reverse, &monolith, writes, &keys).await?;

        let mut out = Outgoing::default();
        for (w, key) in writes.iter().zip(keys) {
            let mut apply = w.apply;
            if states.get(&key).and_then(|d| d.get_str("v").ok()).is_some_and(|held| w.by.version.held_by(held)) {
                if !w.by.redriven {
                    continue; // written back already, or older than what was
                }
                // A dead letter re-driven after later changes: its own fields, merged.
                apply = Apply::Merge(Why::Redriven);
            }
            let slot = match filter_of(&reverse, states.get(&key), w.change)? {
                Some(f) => touched.lookup(&monolith, s, &f).await?,
                None => None,
            };
            let done = match apply {
                Apply::Owner => self.as_owner(s, &reverse, &mut touched, slot, w, &mut out.ops).await?,
                Apply::Merge(why) => self.merged(s, &reverse, &mut touched, slot, w, why, &mut out.ops).await?,
            };
            let Some(m) = done else { continue };
            let held = states.get(&key).and_then(|d| d.get_str("v").ok()).map(str::to_string);
            let v = held.filter(|h| w.by.version.older_than(h)).unwrap_or_else(|| w.by.version.to_string());
            let mut record = doc! { "v": v, "c": collection, "id": w.change.document_id.clone() };
            if let Some(m) = m {
                record.insert("m", m);
            }
            record.insert("deleted", w.change.op == Op::Delete);
            let mut state = record.clone();
            state.insert("_id", key.clone());
            states.insert(key.clone(), state);
            out.records.push((key, record));
        }
        self.send(s, &source, out).await
    }

    /// The batch's states and the monolith documents they lead to, one `$in` query each.
    async fn read_batch(
        &self,
        s: &mut ClientSession,
        reverse: &Reverse<'_>,
        monolith: &mongodb::Collection<Document>,
        writes: &[WriteBackOf<'_>],
        keys: &[String],
    ) -> Result<(HashMap<String, Document>, Touched), SinkError> {
        let states_coll = self.db.collection::<Document>(REVERSE_STATE);
        let mut states: HashMap<String, Document> = HashMap::new();
        for d in find_all(&states_coll, s, doc! { "_id": { "$in": keys } }).await? {
            if let Ok(k) = d.get_str("_id") {
                states.insert(k.to_string(), d.clone());
            }
        }
        // The monolith documents, by the filter each change finds its document with.
        let mut wanted: BTreeMap<String, Vec<Bson>> = BTreeMap::new();
        for (w, key) in writes.iter().zip(keys) {
            if let Some(f) = filter_of(reverse, states.get(key), w.change)? {
                for (field, value) in f {
                    wanted.entry(field).or_default().push(value);
                }
            }
        }
        let mut touched = Touched::default();
        for (field, values) in wanted {
            touched.load(find_all(monolith, s, doc! { field: { "$in": values } }).await?);
        }
        Ok((states, touched))
    }

    /// The owner's change written back: laid over the monolith document as it is now and put
    /// back as a field-scoped patch. Returns the monolith `_id` it went to (`Some(None)`: none,
    /// a delete of what the monolith never had), or `None` when there is nothing to say.
    async fn as_owner(
        &self,
        s: &mut ClientSession,
        reverse: &Reverse<'_>,
        touched: &mut Touched,
        slot: Option<usize>,
        w: &WriteBackOf<'_>,
        ops: &mut Vec<MonolithOp>,
    ) -> Result<Option<Option<Bson>>, SinkError> {
        if w.change.op == Op::Delete {
            let Some(slot) = slot else { return Ok(Some(None)) };
            let id = touched.doc(slot).get("_id").cloned().unwrap_or(Bson::Null);
            touched.delete(slot);
            ops.push(MonolithOp::Delete(id.clone()));
            return Ok(Some(Some(id)));
        }
        let current = slot.map(|i| touched.doc(i));
        // Nothing to say: an update read after its document was deleted, of a document the
        // monolith does not have either (its delete follows).
        let Some(service) = reverse.rebase(current, w.change) else { return Ok(None) };
        let patch = reverse.put(current, &service)?;
        if patch.has_issues() {
            self.record_issues(s, w.by, reverse.source_collection(), &patch, &service, current).await?;
        }
        Ok(Some(Some(write_patch(reverse, touched, slot, &service, &patch, ops)?)))
    }

    /// A change that is not the owner's (a non-owner's write, a late one, a fence violation)
    /// merged into the monolith's document field by field (`sink::merge`, in the service's
    /// shape: the monolith's document as the transform sees it is the owner's), against the
    /// change's own pre-image; what both changed keeps the monolith's value and is recorded.
    #[allow(clippy::too_many_arguments)] // the batch's state, threaded through its steps
    async fn merged(
        &self,
        s: &mut ClientSession,
        reverse: &Reverse<'_>,
        touched: &mut Touched,
        slot: Option<usize>,
        w: &WriteBackOf<'_>,
        why: Why,
        ops: &mut Vec<MonolithOp>,
    ) -> Result<Option<Option<Bson>>, SinkError> {
        let current = slot.map(|i| touched.doc(i).clone());
        let owner = match &current {
            Some(m) => reverse.image(m).map_err(|e| SinkError::Unsupported(e.to_string()))?,
            None => None,
        };
        let base = match (w.change.op, &w.change.before) {
            (Op::Insert, _) => Base::New,
            (_, Some(before)) => Base::Was(before.clone()),
            (_, None) => Base::Unknown,
        };
        // The change's exact result where the pre-image gives it (an update's description
        // applied to it), never the document looked up after it, which may hold later changes:
        // the merge weighs the change against its pre-image (see `consume::direction::exact`).
        let exact = w.change.before.as_ref().and_then(|b| w.change.update_applied_to(b)?.ok());
        let theirs = match w.change.op {
            Op::Delete => None,
            _ => exact.or_else(|| w.change.after.clone()),
        };
        let merged = super::merge::merge(owner.as_ref(), &base, theirs.as_ref(), &reverse.array_keys());
        let id = match merged.write {
            Some(doc) => {
                let patch = reverse.put(current.as_ref(), &doc)?;
                Some(write_patch(reverse, touched, slot, &doc, &patch, ops)?)
            }
            None => current.as_ref().and_then(|m| m.get("_id").cloned()),
        };
        if !merged.conflicts.is_empty() || why == Why::FenceViolation {
            let reason = (why == Why::FenceViolation).then(|| {
                "fence violation: the service wrote a fenced key after the drain point; merged, not lost".to_string()
            });
            let record = ConflictRecord {
                service: self.service().to_string(),
                side: Side::Service,
                collection: reverse.source_collection().to_string(),
                id: id.clone().unwrap_or(Bson::Null),
                event: w.by.event_id.clone(),
                fields: merged.conflicts,
                owner: SideState { version: None, document: current },
                other: SideState { version: Some(w.by.version.to_string()), document: theirs },
                reason,
                why: Some(why),
            };
            Outbox::new(&self.db).record(s, &record).await?;
        }
        Ok(Some(id))
    }

    /// Sends the batch's monolith writes in batch order (consecutive ones of a kind in one
    /// command), then its states.
    async fn send(&self, s: &mut ClientSession, source: &str, out: Outgoing) -> Result<(), SinkError> {
        let mut run: Option<(&str, &str, Vec<Document>)> = None;
        for (command, field, entry) in out.ops.iter().map(MonolithOp::statement) {
            match &mut run {
                Some((c, _, entries)) if *c == command => entries.push(entry),
                _ => {
                    if let Some((c, f, entries)) = run.replace((command, field, vec![entry])) {
                        self.run(s, source, doc! { c: source, f: entries, "ordered": true }).await?;
                    }
                }
            }
        }
        if let Some((c, f, entries)) = run {
            self.run(s, source, doc! { c: source, f: entries, "ordered": true }).await?;
        }
        if !out.records.is_empty() {
            let updates: Vec<Document> = out
                .records
                .into_iter()
                .map(|(key, record)| doc! { "q": { "_id": key }, "u": { "$set": record }, "upsert": true })
                .collect();
            self.run(s, REVERSE_STATE, doc! { "update": REVERSE_STATE, "updates": updates, "ordered": true }).await?;
        }
        Ok(())
    }

    /// Repairs the monolith's side of a conflict the service (the owner) won: makes the
    /// monolith document of a service document say what the owner's says now in the fields in
    /// conflict (`paths`, in the service's shape; `None`: the whole document, restored if the
    /// monolith deleted it; one the owner deleted is left to that delete's write-back), in a
    /// marked transaction like a
    /// write-back's, so its echo is not applied to the service again. `read_owner` reads the
    /// owner's document (`None`: gone) with the service database's cluster time read before it;
    /// `hint` (a service-shaped image, or the owner's last document) locates the monolith's
    /// document when the owner's is gone. A write-back of a change newer than that read, landed
    /// meanwhile, makes it read the owner's document again: the repair never takes back what
    /// the owner wrote since. Returns what it did.
    pub async fn restore<F, Fut>(
        &self,
        collection: &str,
        service_id: &Bson,
        hint: &Document,
        paths: Option<&[super::merge::Spot]>,
        read_owner: F,
    ) -> Result<String, SinkError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(Option<Document>, bson::Timestamp), SinkError>>,
    {
        let Some(reverse) = self.transforms.reverse_for(collection) else {
            return Err(SinkError::Unsupported(format!("{collection} of {} is not written back", self.service())));
        };
        let marker = Marker {
            origin: Origin { service: self.service().to_string(), collection: Some(collection.to_string()) },
            positions: vec![("repair".to_string(), 0, 0)],
            echoes: 0,
            judged: None,
        };
        let key = self.state_key(collection, service_id);
        let mut s = self.client.start_session().await?;
        let mut attempts = 0;
        loop {
            let (owner, read_at) = read_owner().await?;
            mongo::begin(&mut s).await?;
            let outcome = async {
                marker.write(&self.db, &mut s).await?;
                let state = self
                    .db
                    .collection::<Document>(REVERSE_STATE)
                    .find_one(doc! { "_id": &key })
                    .session(&mut s)
                    .await?;
                let newer = crate::event::Version::at(read_at, u32::MAX);
                if state.as_ref().and_then(|d| d.get_str("v").ok()).is_some_and(|v| newer.older_than(v)) {
                    return Ok(None); // the owner wrote since it was read: read it again
                }
                let done = self.restoring(&mut s, &reverse, owner.as_ref(), hint, paths).await?;
                // Touches the document's state, so a write-back of the same document running
                // alongside conflicts with this transaction rather than interleaving.
                self.db
                    .collection::<Document>(REVERSE_STATE)
                    .update_one(doc! { "_id": &key }, doc! { "$set": { "repaired": bson::DateTime::now() } })
                    .upsert(true)
                    .session(&mut s)
                    .await?;
                marker.close(&self.db, &mut s).await?;
                Ok(Some(done))
            }
            .await;
            if let Some(done) = mongo::finish(&mut s, outcome, &mut attempts, SinkError::is_conflict).await {
                match done? {
                    Some(done) => return Ok(done),
                    None => continue,
                }
            }
        }
    }

    /// The writes of [`Self::restore`], in its transaction.
    async fn restoring(
        &self,
        s: &mut ClientSession,
        reverse: &Reverse<'_>,
        owner: Option<&Document>,
        hint: &Document,
        paths: Option<&[super::merge::Spot]>,
    ) -> Result<String, SinkError> {
        let source = reverse.source_collection();
        let monolith = self.db.collection::<Document>(source);
        let filter = reverse.locate(owner.unwrap_or(hint))?;
        let current = monolith.find_one(filter).session(&mut *s).await?;
        let mut ops = Vec::new();
        let what = match (owner, &current) {
            (Some(o), Some(m)) => {
                // Only the fields in conflict: what the monolith changed meanwhile, still on its
                // way to the service, is not taken back.
                let held = paths.map(|spots| super::merge::still_held(o, spots));
                if held.as_ref().is_some_and(Vec::is_empty) {
                    return Ok("the owner's values in conflict have changed since: its later changes carry them".into());
                }
                let wanted = match held.as_deref() {
                    Some(spots) => {
                        let mut image =
                            reverse.image(m).map_err(|e| SinkError::Unsupported(e.to_string()))?.unwrap_or_default();
                        super::merge::take_spots(&mut image, o, spots).map_err(SinkError::Unsupported)?;
                        image
                    }
                    None => o.clone(),
                };
                let patch = reverse.put(Some(m), &wanted)?;
                if patch.set.is_empty() && patch.unset.is_empty() {
                    return Ok("the monolith already held the owner's values".into());
                }
                let id = m.get("_id").cloned().unwrap_or(Bson::Null);
                ops.push(MonolithOp::Update(id, patch.to_update()));
                format!(
                    "the monolith's {source} set to the owner's values ({} fields)",
                    patch.set.len() + patch.unset.len()
                )
            }
            (Some(o), None) => {
                let patch = reverse.put(None, o)?;
                let id = source_id(o, source)
                    .or_else(|| reverse.insert_id(o))
                    .unwrap_or_else(|| Bson::ObjectId(ObjectId::new()));
                let mut created = doc! { "_id": id };
                patch.apply_to(&mut created)?;
                ops.push(MonolithOp::Insert(created));
                format!("the owner's document restored in the monolith's {source}")
            }
            // The owner deleted it while it owned it: that delete is on its way back (the
            // reverse tail publishes it), and removes the monolith's document in its turn.
            (None, Some(_)) => return Ok("the owner's delete is on its way back to the monolith".into()),
            (None, None) => return Ok("both sides hold nothing".into()),
        };
        self.send(s, source, Outgoing { ops, records: Vec::new() }).await?;
        Ok(what)
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
        v: &Versioned<WriteBack>,
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
                element: None,
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
                other: monolith.and_then(|m| get_path(m, &d.path)).cloned(),
                base: None,
                element: None,
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
            why: None,
        };
        Outbox::new(&self.db).record(s, &record).await?;
        Ok(())
    }
}

impl Sink for MonolithSink {
    type Op = WriteBack;

    /// Contract as [`Sink`]'s; the batch is one transaction per service collection, each with
    /// its marker (the marker's origin names the collection, whatever `marker` says; its
    /// positions are `marker`'s).
    async fn apply(&self, batch: &[Versioned<WriteBack>], marker: Option<&Marker>) -> Result<(), SinkError> {
        let mut by_collection: Vec<(&str, Vec<WriteBackOf<'_>>)> = Vec::new();
        for v in batch {
            for WriteBack { collection, change, apply } in &v.ops {
                let w = WriteBackOf { by: v, change, apply: *apply };
                match by_collection.iter_mut().find(|(c, _)| c == collection) {
                    Some((_, writes)) => writes.push(w),
                    None => by_collection.push((collection, vec![w])),
                }
            }
        }
        let judged = match marker {
            Some(m) if !m.positions.is_empty() => m.clone(),
            Some(m) => Marker { positions: vec![("direct".to_string(), 0, 0)], ..m.clone() },
            None => Marker {
                origin: Origin { service: self.service().to_string(), collection: None },
                positions: vec![("direct".to_string(), 0, 0)],
                echoes: 0,
                judged: None,
            },
        };
        for (collection, writes) in &by_collection {
            self.apply_collection(collection, writes, &judged).await?;
        }
        Ok(())
    }
}

/// One change to write back, as the batch carries it.
pub(super) struct WriteBackOf<'a> {
    by: &'a Versioned<WriteBack>,
    change: &'a EventData,
    apply: Apply,
}

/// What a batch sends: the monolith's writes in order, and the states of the changes handled.
#[derive(Default)]
struct Outgoing {
    ops: Vec<MonolithOp>,
    records: Vec<(String, Document)>,
}

/// The monolith `_id` ficus recorded in a service document it wrote (`_ficus.src`), when it
/// names `collection`.
fn source_id(service: &Document, collection: &str) -> Option<Bson> {
    let src = service.get_document(super::META).ok()?.get_document("src").ok()?;
    (src.get_str("c").ok()? == collection)
        .then(|| src.get("id").cloned())
        .flatten()
        .filter(|id| !matches!(id, Bson::Null))
}

/// The filter that finds the monolith document of a change: the one it was linked to, else by
/// its image (`Reverse::locate`); `None` when there is nothing to find it by.
fn filter_of(
    reverse: &Reverse<'_>,
    state: Option<&Document>,
    change: &EventData,
) -> Result<Option<Document>, SinkError> {
    let linked = state.and_then(|d| d.get("m")).filter(|m| !matches!(m, Bson::Null)).cloned();
    Ok(match (linked, change.after.as_ref().or(change.before.as_ref())) {
        (Some(id), _) => Some(doc! { "_id": id }),
        (None, Some(image)) => Some(reverse.locate(image)?),
        (None, None) => None,
    })
}

/// Writes `patch` (what makes the monolith document in `slot` say `service`) to the batch: an
/// update of that document, or an insert of a new one. Returns the monolith `_id`.
fn write_patch(
    reverse: &Reverse<'_>,
    touched: &mut Touched,
    slot: Option<usize>,
    service: &Document,
    patch: &Patch,
    ops: &mut Vec<MonolithOp>,
) -> Result<Bson, SinkError> {
    Ok(match slot {
        Some(slot) => {
            let id = touched.doc(slot).get("_id").cloned().unwrap_or(Bson::Null);
            if !patch.set.is_empty() || !patch.unset.is_empty() {
                touched.patch(slot, patch)?;
                ops.push(MonolithOp::Update(id.clone(), patch.to_update()));
            }
            id
        }
        None => {
            let id = reverse.insert_id(service).unwrap_or_else(|| Bson::ObjectId(ObjectId::new()));
            let mut created = doc! { "_id": id.clone() };
            patch.apply_to(&mut created)?;
            touched.insert(created.clone());
            ops.push(MonolithOp::Insert(created));
            id
        }
    })
}
