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
                for (v, change) in writes {
                    self.write_back(&mut s, v, collection, change).await?;
                }
                marker.close(&self.db, &mut s).await
            }
            .await;
            if let Some(done) = mongo::finish(&mut s, outcome, &mut attempts, SinkError::is_conflict).await {
                return done;
            }
        }
    }

    /// Writes one service change back (see the module header).
    async fn write_back(
        &self,
        s: &mut ClientSession,
        v: &Versioned,
        collection: &str,
        change: &EventData,
    ) -> Result<(), SinkError> {
        let Some(reverse) = self.transforms.reverse_for(collection) else {
            return Err(SinkError::Unsupported(format!("{collection} of {} is not written back", self.service())));
        };
        let states = self.db.collection::<Document>(REVERSE_STATE);
        let key = self.state_key(collection, &change.document_id);
        let state = states.find_one(doc! { "_id": &key }).session(&mut *s).await?;
        if state.as_ref().and_then(|d| d.get_str("v").ok()).is_some_and(|held| held >= v.version.as_str()) {
            return Ok(()); // written back already, or older than what was
        }
        let monolith = self.db.collection::<Document>(reverse.source_collection());
        // The monolith document: the one linked to, else where the service document says.
        let linked = state.as_ref().and_then(|d| d.get("m")).filter(|m| !matches!(m, Bson::Null)).cloned();
        let filter = match (linked, change.after.as_ref().or(change.before.as_ref())) {
            (Some(id), _) => Some(doc! { "_id": id }),
            (None, Some(image)) => Some(reverse.locate(image)?),
            (None, None) => None,
        };
        let current = match &filter {
            Some(f) => monolith.find_one(f.clone()).session(&mut *s).await?,
            None => None,
        };
        let mut record = doc! { "v": v.version.as_str(), "c": collection, "id": change.document_id.clone() };
        if change.op == Op::Delete {
            if let Some(id) = current.as_ref().and_then(|d| d.get("_id")) {
                monolith.delete_one(doc! { "_id": id.clone() }).session(&mut *s).await?;
                record.insert("m", id.clone());
            }
            record.insert("deleted", true);
        } else {
            // Nothing to say: an update read after its document was deleted, of a document the
            // monolith does not have either (its delete follows).
            let Some(service) = reverse.rebase(current.as_ref(), change) else { return Ok(()) };
            let patch = reverse.put(current.as_ref(), &service)?;
            let id = match &current {
                Some(d) => {
                    let id = d.get("_id").cloned().unwrap_or(Bson::Null);
                    if !patch.set.is_empty() || !patch.unset.is_empty() {
                        monolith.update_one(doc! { "_id": id.clone() }, patch.to_update()).session(&mut *s).await?;
                    }
                    id
                }
                None => {
                    let id = reverse.insert_id(&service).unwrap_or_else(|| Bson::ObjectId(ObjectId::new()));
                    let mut created = doc! { "_id": id.clone() };
                    patch.apply_to(&mut created)?;
                    monolith.insert_one(created).session(&mut *s).await?;
                    id
                }
            };
            record.insert("m", id);
            record.insert("deleted", false);
            if patch.has_issues() {
                self.record_issues(s, v, reverse.source_collection(), &patch, &service, current.as_ref()).await?;
            }
        }
        states.update_one(doc! { "_id": &key }, doc! { "$set": record }).upsert(true).session(&mut *s).await?;
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
