//! Conflicts converge: where a merge kept the owner's value, the losing side is repaired with
//! it, so both sides hold the same and `ficus verify` passes after any mix of conflicting writes.
//!
//! A conflict is recorded in the transaction that merged the change (the outbox, see
//! `sink::conflicts`); the consumer that recorded it repairs the other side when it relays the
//! record, before removing it, so a crash in between repeats the repair (each is idempotent:
//! it writes the owner's state as it is then):
//!
//! - the service won (a monolith change met the service's document): the monolith's document
//!   is made to say what the owner's says now, through the reverse of the transform
//!   (`MonolithSink::restore`), in a marked transaction so the service does not take the echo
//!   for a change of the monolith's;
//! - the monolith won (a service change met the monolith's document): the service's document is
//!   made what the monolith's makes of it now, whole, read at a cluster time that versions the
//!   write like a snapshot copy (nothing older lands over it later), marked so the service's
//!   tail does not take it for the service's. Whole, not only the fields in conflict: the
//!   version says the document holds the monolith's state at that time, so a monolith change
//!   older than it, still on its way, is skipped when it comes, and what it carried must
//!   already be there (a repair of the conflict's fields alone lost such a change's counter).
//!
//! A delete on the non-owner's side of a document the owner keeps is a conflict on the whole
//! document, resolved by the policy the README documents: the owner's document stands and is
//! restored on the non-owner's side (and a change on the non-owner's side of a document the
//! owner deleted is undone there).

use std::sync::Arc;

use bson::{Bson, Document, doc};
use mongodb::Database;

use super::ConsumeError;
use crate::config::topics::Topics;
use crate::event::Version;
use crate::sink::merge::Spot;
use crate::sink::{Marker, MongoSink, MonolithSink, Sink, SinkError, Versioned};
use crate::transform::{ServiceTransforms, WriteOp};

/// What repairs the other side of a service's conflicts.
#[derive(Clone)]
pub struct Repairs {
    pub transforms: Arc<ServiceTransforms>,
    pub topics: Arc<Topics>,
    /// The source's name (events' `source`), for copies of monolith documents.
    pub source_name: String,
    pub monolith: MonolithSink,
    pub service: MongoSink,
}

impl Repairs {
    fn service_db(&self) -> &Database {
        self.service.database()
    }

    fn monolith_db(&self) -> &Database {
        self.monolith.database()
    }

    /// Repairs the losing side of one recorded conflict (as the outbox holds it); returns what
    /// was done, `None` when the record asks for nothing (a fence violation merged cleanly).
    pub async fn repair(&self, record: &Document) -> Result<Option<String>, ConsumeError> {
        let fields = record.get_array("fields").map(Vec::len).unwrap_or(0);
        if fields == 0 {
            return Ok(None);
        }
        let done = match record.get_str("side") {
            Ok("monolith") => self.monolith_side(record).await?,
            Ok("service") => self.service_side(record).await?,
            _ => return Ok(None),
        };
        metrics::counter!("ficus_conflict_repairs_total", "service" => self.transforms.service().to_string(), "side" => record.get_str("side").unwrap_or("?").to_string()).increment(1);
        Ok(Some(done))
    }

    /// The service won: the monolith's document is made to say what the owner's says now.
    async fn monolith_side(&self, record: &Document) -> Result<String, ConsumeError> {
        let collection = record.get_str("collection").unwrap_or_default().to_string();
        let id = record.get("id").cloned().unwrap_or(Bson::Null);
        let image = |side: &str| record.get_document(side).ok().and_then(|s| s.get_document("document").ok()).cloned();
        let hint = image("owner").or_else(|| image("other")).unwrap_or_else(|| doc! { "_id": id.clone() });
        let service = self.service_db().clone();
        let read_owner = || {
            let (service, collection, id) = (service.clone(), collection.clone(), id.clone());
            async move {
                let at = crate::mongo::cluster_time(&service)
                    .await?
                    .ok_or_else(|| SinkError::Unsupported("the service database reports no cluster time".into()))?;
                let owner = service.collection::<Document>(&collection).find_one(doc! { "_id": id }).await?;
                Ok((owner, at))
            }
        };
        let spots = conflict_spots(record);
        let whole = spots.iter().any(|s| s.path == "(document)");
        let spots = (!whole).then_some(spots.as_slice());
        Ok(self.monolith.restore(&collection, &id, &hint, spots, read_owner).await?)
    }

    /// The monolith won: the service's document is made what the monolith's makes of it now
    /// (restored, replaced or removed), as a snapshot copy read at the cluster time taken before
    /// the read would write it (see the module header).
    async fn service_side(&self, record: &Document) -> Result<String, ConsumeError> {
        let source = record.get_str("collection").unwrap_or_default();
        let reverse = self
            .transforms
            .written_back()
            .into_iter()
            .filter_map(|c| self.transforms.reverse_for(c))
            .find(|r| r.source_collection() == source);
        let Some(reverse) = reverse else {
            return Ok(format!("nothing to repair: {source} feeds no collection written back"));
        };
        let collection = reverse.collection().to_string();
        let other = record.get_document("other").ok().and_then(|o| o.get_document("document").ok()).cloned();
        let at = crate::mongo::cluster_time(self.monolith_db())
            .await?
            .ok_or_else(|| SinkError::Unsupported("the monolith reports no cluster time".into()))?;
        let monolith = self.monolith_db().collection::<Document>(source);
        let current = match record.get("id").filter(|id| !matches!(id, Bson::Null)) {
            Some(id) => monolith.find_one(doc! { "_id": id.clone() }).await?,
            None => match &other {
                Some(o) => monolith.find_one(reverse.locate(o).map_err(SinkError::from)?).await?,
                None => None,
            },
        };
        let copy = match &current {
            Some(m) => self.copy_of(source, &collection, m)?,
            None => None,
        };
        let version = Version::at(at, 0);
        let source_id = current.as_ref().and_then(|m| m.get("_id")).cloned().unwrap_or(Bson::Null);
        match copy {
            Some((id, image)) => {
                let op = WriteOp::Upsert { collection: collection.clone(), id, doc: image };
                let what = format!(
                    "the service's {collection} document made the monolith's ({} conflicts)",
                    record.get_array("fields").map(Vec::len).unwrap_or(0)
                );
                self.write(source, source_id, version, op).await.map(|()| what)
            }
            None => {
                let Some(id) = other.as_ref().and_then(|o| o.get("_id")).cloned() else {
                    return Ok("nothing to repair: no document on either side".into());
                };
                let op = WriteOp::Delete { collection: collection.clone(), id: Some(id) };
                let what = format!("removed from the service's {collection}, as the monolith has it not");
                self.write(source, source_id, version, op).await.map(|()| what)
            }
        }
    }

    /// What the service's `collection` holds for a monolith document (its `_id` there and the
    /// document), as a snapshot copy of it would write; `None` when it holds nothing for it.
    fn copy_of(&self, source: &str, collection: &str, m: &Document) -> Result<Option<(Bson, Document)>, ConsumeError> {
        let def = self
            .topics
            .for_collection(source)
            .ok_or_else(|| SinkError::Unsupported(format!("no topic definition for the monolith's {source}")))?;
        let ops = self
            .transforms
            .writes_of_copy(def, &self.source_name, m.clone())
            .map_err(|e| SinkError::Unsupported(e.to_string()))?;
        Ok(ops.into_iter().find_map(|op| match op {
            WriteOp::Upsert { collection: c, id, doc } if c == collection => Some((id, doc)),
            _ => None,
        }))
    }

    /// One write into the service database, versioned like a snapshot copy read at `version`
    /// and marked as ficus's own.
    async fn write(&self, source: &str, source_id: Bson, version: Version, op: WriteOp) -> Result<(), ConsumeError> {
        let batch = [Versioned {
            version,
            event_id: "repair".into(),
            source_collection: source.to_string(),
            source_id,
            event_time: bson::DateTime::now(),
            ops: vec![op],
            redriven: false,
        }];
        let marker = Marker {
            origin: crate::event::Origin { service: self.transforms.service().to_string(), collection: None },
            positions: vec![("repair".to_string(), 0, 0)],
            echoes: 0,
            judged: None,
        };
        self.service.apply(&batch, Some(&marker)).await?;
        Ok(())
    }
}

/// Where a conflict record's conflicts are (`(document)` for the whole document).
fn conflict_spots(record: &Document) -> Vec<Spot> {
    let spot = |f: &Document| {
        let element = f
            .get_document("element")
            .ok()
            .and_then(|e| Some((e.get_str("field").ok()?.to_string(), e.get("id")?.clone())));
        let was = f.get("owner").map(|v| (!matches!(v, Bson::Null)).then(|| v.clone()));
        Some(Spot { path: f.get_str("path").ok()?.to_string(), element, was })
    };
    record.get_array("fields").map(|f| f.iter().filter_map(|f| spot(f.as_document()?)).collect()).unwrap_or_default()
}
