//! The MongoDB adapter of the sink: version-guarded bulk upserts, deletes with tombstones,
//! rollup memberships in transactions, retains and sweeps (see the module above for what each
//! guarantees, and [`super::plan`] for the order they go out in).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use mongodb::options::{Acknowledgment, IndexOptions, WriteConcern};
use mongodb::{Client, ClientSession, Database, IndexModel};

mod merging;
mod rollups;

use self::merging::Merge;
use self::rollups::Membership;
use super::plan::{Built, Plan, Step, Upsert, plan, retained_away};
use super::{MEMBERS_PREFIX, META, Marker, SNAPSHOTS, Sink, SinkError, TOMBSTONES, Versioned, doc_key};
use crate::event::Version;
use crate::mongo;
use crate::transform::WriteOp;

/// The MongoDB sink for one service database.
#[derive(Clone)]
pub struct MongoSink {
    client: Client,
    db: Database,
}

const DUPLICATE_KEY: i32 = 11000;
const NAMESPACE_NOT_FOUND: i32 = 26;
/// Statements per `update` command are cut well below MongoDB's 16 MB message limit.
const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;

impl MongoSink {
    /// Opens the service database and makes sure ficus's indexes exist, and that the
    /// collections `written_back` (those the service writes back to the monolith) record
    /// pre-images, creating them so if need be (see [`crate::pre_images`]).
    pub async fn open(
        client: Client,
        database: &str,
        collections: &BTreeSet<String>,
        written_back: &[&str],
        tombstone_ttl: Duration,
    ) -> Result<Self, SinkError> {
        let wc = WriteConcern::builder().w(Acknowledgment::Majority).journal(true).build();
        let db = client
            .database_with_options(database, mongodb::options::DatabaseOptions::builder().write_concern(wc).build());
        let sink = MongoSink { client, db };
        sink.keep_tombstones_for(tombstone_ttl).await?;
        // Before the indexes below, which would create a collection without them.
        for c in written_back {
            let done = crate::pre_images::ensure(&sink.db, c).await?;
            if done != crate::pre_images::Ensured::Already {
                tracing::info!(database, collection = c, ?done, "pre-images on for a collection written back");
            }
        }
        for c in collections {
            sink.db
                .collection::<Document>(c)
                .create_index(IndexModel::builder().keys(doc! { "_ficus.src.id": 1 }).build())
                .await?;
        }
        Ok(sink)
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    /// How long this database keeps tombstones (its TTL index), if it has them yet.
    pub async fn tombstone_ttl(db: &Database) -> Result<Option<Duration>, SinkError> {
        let mut indexes = match db.collection::<Document>(TOMBSTONES).list_indexes().await {
            Ok(c) => c,
            // No collection, no index.
            Err(e) if mongo::error_code(&e) == Some(NAMESPACE_NOT_FOUND) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        while let Some(i) = indexes.try_next().await? {
            if let Some(ttl) = i.options.and_then(|o| o.expire_after) {
                return Ok(Some(ttl));
            }
        }
        Ok(None)
    }

    /// Makes tombstones live at least `ttl`. Every command that writes a service database opens
    /// it with its own settings, and MongoDB refuses to create the same index with another TTL;
    /// so an existing index is kept when it is longer (a longer TTL is always safe: it refuses
    /// late writes for longer) and lengthened in place when it is shorter, never shortened.
    async fn keep_tombstones_for(&self, ttl: Duration) -> Result<(), SinkError> {
        match Self::tombstone_ttl(&self.db).await? {
            None => {
                let options = IndexOptions::builder().expire_after(ttl).name("ttl".to_string()).build();
                self.db
                    .collection::<Document>(TOMBSTONES)
                    .create_index(IndexModel::builder().keys(doc! { "at": 1 }).options(options).build())
                    .await?;
            }
            Some(held) if held >= ttl => {
                if held > ttl {
                    tracing::info!(
                        database = %self.db.name(),
                        held_days = held.as_secs() / 86_400,
                        asked_days = ttl.as_secs() / 86_400,
                        "tombstones are kept longer than asked; keeping the longer TTL"
                    );
                }
            }
            Some(held) => {
                tracing::warn!(
                    database = %self.db.name(),
                    from_days = held.as_secs() / 86_400,
                    to_days = ttl.as_secs() / 86_400,
                    "lengthening the tombstones' TTL"
                );
                self.db
                    .run_command(doc! {
                        "collMod": TOMBSTONES,
                        "index": { "name": "ttl", "expireAfterSeconds": ttl.as_secs() as i64 },
                    })
                    .await?;
            }
        }
        Ok(())
    }

    /// The `_ficus` metadata of a document written by `v`'s message (public for the benchmarks,
    /// which build the documents this sink writes).
    pub fn meta(v: &Versioned) -> Document {
        doc! { "v": v.version.as_str(), "src": { "c": &v.source_collection, "id": v.source_id.clone() }, "event": &v.event_id }
    }

    /// The tombstones of some documents of a collection: [`doc_key`] → the deleting version.
    async fn tombstones<'a>(
        &self,
        s: &mut ClientSession,
        collection: &str,
        ids: impl Iterator<Item = &'a Bson>,
    ) -> Result<HashMap<String, String>, SinkError> {
        let keys: Vec<String> = ids.map(|id| doc_key(collection, id)).collect();
        let mut tombs = HashMap::new();
        let found: Vec<Document> = self
            .db
            .collection::<Document>(TOMBSTONES)
            .find(doc! { "_id": { "$in": keys } })
            .session(&mut *s)
            .await?
            .stream(&mut *s)
            .try_collect()
            .await?;
        for t in found {
            if let (Ok(key), Ok(v)) = (t.get_str("_id"), t.get_str("v")) {
                tombs.insert(key.to_string(), v.to_string());
            }
        }
        Ok(tombs)
    }

    /// The stored versions of some documents of a collection, by `_id` (as text).
    async fn versions<'a>(
        &self,
        s: &mut ClientSession,
        collection: &str,
        ids: impl Iterator<Item = &'a Bson>,
    ) -> Result<HashMap<String, String>, SinkError> {
        let ids: Vec<Bson> = ids.cloned().collect();
        let found: Vec<Document> = self
            .db
            .collection::<Document>(collection)
            .find(doc! { "_id": { "$in": ids } })
            .projection(doc! { "_ficus.v": 1 })
            .session(&mut *s)
            .await?
            .stream(&mut *s)
            .try_collect()
            .await?;
        Ok(found
            .into_iter()
            .filter_map(|d| {
                let v = d.get_document(META).ok()?.get_str("v").ok()?.to_string();
                Some((d.get("_id")?.to_string(), v))
            })
            .collect())
    }

    /// Version-guarded replace-or-insert of many documents of one collection, in as few round
    /// trips as the 16 MB command limit allows: one query for tombstones, one `update` command
    /// per chunk. A document that is newer, or a tombstone that is newer, wins; either way that
    /// write is a no-op (outside a transaction the guard's failed upsert surfaces as a duplicate
    /// key, ignored; inside one, where a duplicate key would abort it, the stored versions are
    /// read first and newer documents are left out).
    ///
    /// The tombstone check and the upsert are two steps, so a newer delete of the same document
    /// (from another consumer: a replay's catch-up, or a fan-in target) can land between them.
    /// A second look at the tombstones after the upserts closes that window: the delete writes
    /// its tombstone before deleting, so either this second look sees the tombstone and removes
    /// what the upsert resurrected, or the tombstone came later and the delete itself removes
    /// the document this upsert wrote.
    async fn upsert_many(
        &self,
        s: &mut ClientSession,
        txn: bool,
        collection: &str,
        items: &[Upsert<'_>],
    ) -> Result<(), SinkError> {
        let tombs = self.tombstones(s, collection, items.iter().map(|u| u.id)).await?;
        let held = if txn { self.versions(s, collection, items.iter().map(|u| u.id)).await? } else { HashMap::new() };
        let mut written: Vec<(Bson, &Version)> = Vec::with_capacity(items.len());
        let mut statements: Vec<Document> = Vec::with_capacity(items.len());
        let mut size = 0usize;
        for Upsert { by: v, id, doc } in items {
            let (id, mut doc) = ((*id).clone(), (*doc).clone());
            if tombs.get(&doc_key(collection, &id)).is_some_and(|t| v.version.held_by(t)) {
                continue; // deleted by a newer event
            }
            if held.get(&id.to_string()).is_some_and(|h| v.version.held_by(h)) {
                continue; // already as new or newer
            }
            doc.insert("_id", id.clone());
            doc.insert(META, Self::meta(v));
            size += bson::serialize_to_vec(&doc).map(|b| b.len()).unwrap_or(0) + 256;
            // `$not: {$gte}` also matches a document without `_ficus.v`, in one indexable predicate
            // (an `$or` here made the server scan the collection per upsert).
            let q = doc! { "_id": id.clone(), "_ficus.v": { "$not": { "$gte": v.version.as_str() } } };
            statements.push(doc! { "q": q, "u": doc, "upsert": true });
            written.push((id, &v.version));
            if size > MAX_COMMAND_BYTES {
                self.run_updates(s, txn, collection, std::mem::take(&mut statements)).await?;
                size = 0;
            }
        }
        self.run_updates(s, txn, collection, statements).await?;

        let late = self.tombstones(s, collection, written.iter().map(|(id, _)| id)).await?;
        let coll = self.db.collection::<Document>(collection);
        for (id, version) in &written {
            if let Some(t) = late.get(&doc_key(collection, id)).filter(|t| version.held_by(t)) {
                coll.delete_one(doc! { "_id": id.clone(), "_ficus.v": { "$lt": t.as_str() } }).session(&mut *s).await?;
            }
        }
        Ok(())
    }

    async fn run_updates(
        &self,
        s: &mut ClientSession,
        txn: bool,
        collection: &str,
        statements: Vec<Document>,
    ) -> Result<(), SinkError> {
        if statements.is_empty() {
            return Ok(());
        }
        let mut command = doc! { "update": collection, "updates": statements, "ordered": false };
        // Inside a transaction its commit carries the write concern.
        if !txn {
            command.insert("writeConcern", doc! { "w": "majority", "j": true });
        }
        let reply = self.db.run_command(command).session(&mut *s).await?;
        if let Ok(errors) = reply.get_array("writeErrors") {
            for e in errors.iter().filter_map(Bson::as_document) {
                let code = e.get_i32("code").unwrap_or(0);
                if code != DUPLICATE_KEY {
                    let message = e.get_str("errmsg").unwrap_or("").to_string();
                    return Err(SinkError::Write { collection: collection.to_string(), code, message });
                }
            }
        }
        if let Ok(wce) = reply.get_document("writeConcernError") {
            let code = wce.get_i32("code").unwrap_or(0);
            let message = wce.get_str("errmsg").unwrap_or("").to_string();
            return Err(SinkError::Write { collection: collection.to_string(), code, message });
        }
        Ok(())
    }

    async fn delete(
        &self,
        s: &mut ClientSession,
        v: &Versioned,
        collection: &str,
        id: Option<&Bson>,
    ) -> Result<(), SinkError> {
        let coll = self.db.collection::<Document>(collection);
        let ids: Vec<Bson> = match id {
            Some(id) => vec![id.clone()],
            None => {
                let filter = doc! { "_ficus.src.c": &v.source_collection, "_ficus.src.id": v.source_id.clone() };
                coll.find(filter)
                    .projection(doc! { "_id": 1 })
                    .session(&mut *s)
                    .await?
                    .stream(&mut *s)
                    .try_collect::<Vec<_>>()
                    .await?
                    .into_iter()
                    .filter_map(|d| d.get("_id").cloned())
                    .collect()
            }
        };
        let tombs = self.db.collection::<Document>(TOMBSTONES);
        for id in ids {
            tombs
                .update_one(
                    doc! { "_id": doc_key(collection, &id) },
                    doc! {
                        "$max": { "v": v.version.as_str() },
                        "$set": { "c": collection, "id": id.clone(), "at": bson::DateTime::now() },
                    },
                )
                .upsert(true)
                .session(&mut *s)
                .await?;
            coll.delete_one(doc! { "_id": id, "_ficus.v": { "$lt": v.version.as_str() } }).session(&mut *s).await?;
        }
        Ok(())
    }

    /// Makes what some source documents built in `collection` (a target of array elements)
    /// match the elements they have now: for each source document, the newest [`WriteOp::Retain`]
    /// of the batch names the target documents that stay; the others, unless newer than it, are
    /// deleted (with tombstones) at its version. One query for the whole batch.
    async fn retain(
        &self,
        s: &mut ClientSession,
        collection: &str,
        retains: &[(&Versioned, &[Bson])],
    ) -> Result<(), SinkError> {
        let source_collection = retains.first().map(|(v, _)| v.source_collection.clone()).unwrap_or_default();
        let ids: Vec<Bson> = retains.iter().map(|(v, _)| v.source_id.clone()).collect();
        let found: Vec<Document> = self
            .db
            .collection::<Document>(collection)
            .find(doc! { "_ficus.src.c": &source_collection, "_ficus.src.id": { "$in": ids } })
            .projection(doc! { "_id": 1, "_ficus.src.id": 1, "_ficus.v": 1 })
            .session(&mut *s)
            .await?
            .stream(&mut *s)
            .try_collect()
            .await?;
        let mut built: Vec<Built> = Vec::new();
        for d in found {
            let meta = d.get_document(META).ok();
            let (Some(id), Some(src)) = (d.get("_id"), meta.and_then(|m| m.get_document("src").ok())) else {
                continue;
            };
            built.push(Built {
                id: id.clone(),
                source_id: src.get("id").cloned().unwrap_or(Bson::Null),
                version: Version::stored(meta.and_then(|m| m.get_str("v").ok()).unwrap_or_default()),
            });
        }
        for (v, id) in retained_away(retains, &built) {
            self.delete(s, v, collection, Some(&id)).await?;
        }
        Ok(())
    }

    /// Records one partition's snapshot marker; when every partition has reported, removes what
    /// the snapshot did not refresh (see [`WriteOp::Sweep`]). Idempotent: markers delivered again,
    /// or a sweep cut short and run again, change nothing more.
    async fn sweep(&self, s: &mut ClientSession, txn: bool, v: &Versioned, op: &WriteOp) -> Result<(), SinkError> {
        let WriteOp::Sweep { collection, source_collection, before, partition, partitions, rollup } = op else {
            return Ok(());
        };
        let (collection, source_collection, before) =
            (collection.as_str(), source_collection.as_str(), before.as_str());
        let stale = doc! { "_ficus.src.c": source_collection, "_ficus.v": { "$lt": before } };
        let (partition, partitions) = (*partition, *partitions);
        let rollup = rollup.as_ref();
        let snapshots = self.db.collection::<Document>(SNAPSHOTS);
        let id = doc! { "collection": collection, "source": source_collection, "start": before };
        let seen = snapshots
            .find_one_and_update(doc! { "_id": id.clone() }, doc! { "$addToSet": { "partitions": partition } })
            .upsert(true)
            .return_document(mongodb::options::ReturnDocument::After)
            .session(&mut *s)
            .await?
            .unwrap_or_default();
        let reported = seen.get_array("partitions").map_or(0, Vec::len);
        if reported < partitions as usize || seen.get_bool("swept").unwrap_or(false) {
            return Ok(());
        }
        // Deletes and leaves at the snapshot's own version: older than every copy it made.
        let at = Versioned { version: Version::stored(before), ..v.clone() };
        let mut removed = 0u64;
        let ids =
            |found: Vec<Document>| -> Vec<Bson> { found.into_iter().filter_map(|d| d.get("_id").cloned()).collect() };
        match rollup {
            None => {
                let coll = self.db.collection::<Document>(collection);
                let found = coll
                    .find(stale)
                    .projection(doc! { "_id": 1 })
                    .session(&mut *s)
                    .await?
                    .stream(&mut *s)
                    .try_collect()
                    .await?;
                for id in ids(found) {
                    self.delete(s, &at, collection, Some(&id)).await?;
                    removed += 1;
                }
            }
            Some((count_field, distinct)) => {
                let members = self.db.collection::<Document>(&format!("{MEMBERS_PREFIX}{collection}"));
                let stale = doc! { "v": { "$lt": before }, "g": { "$ne": Bson::Null } };
                let found = members
                    .find(stale)
                    .projection(doc! { "_id": 1 })
                    .session(&mut *s)
                    .await?
                    .stream(&mut *s)
                    .try_collect()
                    .await?;
                let leave: Vec<(String, Option<Bson>)> = distinct.iter().map(|d| (d.clone(), None)).collect();
                for member in ids(found) {
                    let leave = Membership {
                        group: None,
                        member: &member,
                        count_field,
                        distinct: &leave,
                        group_fields: &Document::new(),
                    };
                    self.rollup(s, txn, &at, collection, &leave).await?;
                    removed += 1;
                }
            }
        }
        snapshots
            .update_one(doc! { "_id": id }, doc! { "$set": { "swept": true, "removed": removed as i64 } })
            .session(&mut *s)
            .await?;
        tracing::info!(
            collection,
            source = source_collection,
            removed,
            "snapshot complete on every partition: removed what the source no longer has"
        );
        Ok(())
    }

    /// Everything after the upserts, in plan order, on one session.
    async fn rest(&self, s: &mut ClientSession, txn: bool, plan: &Plan<'_>) -> Result<(), SinkError> {
        for Step { by, op } in &plan.steps {
            match op {
                WriteOp::Delete { collection, id } => self.delete(s, by, collection, id.as_ref()).await?,
                WriteOp::Rollup { collection, group, member, count_field, distinct, group_fields } => {
                    let m = Membership { group: group.as_ref(), member, count_field, distinct, group_fields };
                    self.rollup(s, txn, by, collection, &m).await?
                }
                WriteOp::Merge { collection, id, doc, base, why, arrays } => {
                    let m = Merge { collection, id, doc: doc.as_ref(), base, why: *why, arrays };
                    self.merge(s, txn, by, &m).await?
                }
                WriteOp::Witness { collection, id, deleted } => self.witness(s, by, collection, id, *deleted).await?,
                _ => {}
            }
        }
        for (collection, retains) in &plan.retains {
            self.retain(s, collection, retains).await?;
        }
        for Step { by, op } in &plan.sweeps {
            self.sweep(s, txn, by, op).await?;
        }
        Ok(())
    }

    /// The whole batch as one transaction that first writes its apply marker (see `tail::echo`).
    async fn apply_marked(&self, batch: &[Versioned], marker: &Marker) -> Result<(), SinkError> {
        let plan = plan(batch);
        let mut s = self.client.start_session().await?;
        let mut attempts = 0;
        loop {
            mongo::begin(&mut s).await?;
            let outcome = self.marked(&mut s, &plan, marker).await;
            if let Some(done) = mongo::finish(&mut s, outcome, &mut attempts, SinkError::is_conflict).await {
                return done;
            }
        }
    }

    async fn marked(&self, s: &mut ClientSession, plan: &Plan<'_>, marker: &Marker) -> Result<(), SinkError> {
        marker.still_judged()?;
        marker.write(&self.db, s).await?;
        for (collection, items) in &plan.upserts {
            self.upsert_many(s, true, collection, items).await?;
        }
        self.rest(s, true, plan).await?;
        marker.still_judged()?;
        marker.close(&self.db, s).await
    }
}

impl Sink for MongoSink {
    type Op = WriteOp;

    async fn apply(&self, batch: &[Versioned], marker: Option<&Marker>) -> Result<(), SinkError> {
        if let Some(marker) = marker {
            return self.apply_marked(batch, marker).await;
        }
        let plan = plan(batch);
        // Collections are independent: their bulk writes go out together, each on its session.
        futures::future::try_join_all(plan.upserts.iter().map(|(c, items)| async move {
            let mut s = self.client.start_session().await?;
            self.upsert_many(&mut s, false, c, items).await
        }))
        .await?;
        let mut s = self.client.start_session().await?;
        self.rest(&mut s, false, &plan).await
    }
}
