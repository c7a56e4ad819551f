//! Where verify keeps its expectation (one entry per expected target document: its key, content
//! hash, the monolith document it came from, whether the target had it): in memory while it
//! fits [`MEMORY_ENTRIES`], spilled whole into a scratch collection in ficus's store once it
//! does not, so memory stays bounded at any size. In memory, a verify makes no round trip to
//! the store per batch (the collection's inserts, `$in` lookups and `seen` updates were most of
//! its time); past the bound it works as before, at the store's pace.

use std::collections::HashMap;

use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use mongodb::Collection;
use mongodb::options::InsertManyOptions;

use super::VerifyError;

/// Entries kept in memory at most (about 300 bytes each: some 60 MB).
pub const MEMORY_ENTRIES: usize = 200_000;

/// The expectation of one verify.
pub(super) struct Scratch {
    memory: Option<HashMap<String, Document>>,
    coll: Collection<Document>,
    limit: usize,
}

impl Scratch {
    /// An empty expectation (the collection of an earlier run dropped).
    pub async fn new(coll: Collection<Document>, limit: usize) -> Result<Scratch, VerifyError> {
        coll.drop().await?;
        Ok(Scratch { memory: Some(HashMap::new()), coll, limit })
    }

    /// Adds entries (`_id`: the target key); an entry already there stays (the same target
    /// reported twice lands once, as in the sink).
    pub async fn insert(&mut self, entries: Vec<Document>) -> Result<(), VerifyError> {
        if let Some(map) = &mut self.memory {
            if map.len() + entries.len() <= self.limit {
                for e in entries {
                    let key = e.get_str("_id").unwrap_or_default().to_string();
                    map.entry(key).or_insert(e);
                }
                return Ok(());
            }
            let kept: Vec<Document> = map.drain().map(|(_, e)| e).collect();
            self.memory = None;
            for chunk in kept.chunks(1000) {
                self.store(chunk.to_vec()).await?;
            }
        }
        self.store(entries).await
    }

    async fn store(&self, entries: Vec<Document>) -> Result<(), VerifyError> {
        if entries.is_empty() {
            return Ok(());
        }
        let unordered = InsertManyOptions::builder().ordered(false).build();
        match self.coll.insert_many(entries).with_options(unordered).await {
            Ok(_) => Ok(()),
            Err(e) if duplicates_only(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Expected entries of collection `c`.
    pub async fn count(&self, c: &str) -> Result<u64, VerifyError> {
        match &self.memory {
            Some(map) => Ok(map.values().filter(|e| e.get_str("c").is_ok_and(|x| x == c)).count() as u64),
            None => Ok(self.coll.count_documents(doc! { "c": c }).await?),
        }
    }

    /// The entries of these keys, each marked as seen in the target.
    pub async fn take_seen(&mut self, keys: &[String]) -> Result<Vec<Document>, VerifyError> {
        match &mut self.memory {
            Some(map) => Ok(keys
                .iter()
                .filter_map(|k| {
                    let e = map.get_mut(k)?;
                    e.insert("seen", true);
                    Some(e.clone())
                })
                .collect()),
            None => {
                let found: Vec<Document> = self.coll.find(doc! { "_id": { "$in": keys } }).await?.try_collect().await?;
                self.coll.update_many(doc! { "_id": { "$in": keys } }, doc! { "$set": { "seen": true } }).await?;
                Ok(found)
            }
        }
    }

    /// The ids of collection `c`'s entries the target did not have.
    pub async fn unseen(&self, c: &str) -> Result<Vec<Bson>, VerifyError> {
        match &self.memory {
            Some(map) => Ok(map
                .values()
                .filter(|e| e.get_str("c").is_ok_and(|x| x == c) && !e.get_bool("seen").unwrap_or(false))
                .filter_map(|e| e.get("id").cloned())
                .collect()),
            None => {
                let unseen =
                    self.coll.find(doc! { "c": c, "seen": { "$ne": true } }).projection(doc! { "id": 1 }).await?;
                let docs: Vec<Document> = unseen.try_collect().await?;
                Ok(docs.into_iter().filter_map(|d| d.get("id").cloned()).collect())
            }
        }
    }

    /// The entry of one key.
    pub async fn get(&self, key: &str) -> Result<Option<Document>, VerifyError> {
        match &self.memory {
            Some(map) => Ok(map.get(key).cloned()),
            None => Ok(self.coll.find_one(doc! { "_id": key }).await?),
        }
    }

    /// The entries of these keys.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Document>, VerifyError> {
        match &self.memory {
            Some(map) => Ok(keys.iter().filter_map(|k| map.get(k).cloned()).collect()),
            None => Ok(self.coll.find(doc! { "_id": { "$in": keys } }).await?.try_collect().await?),
        }
    }

    /// Forgets the expectation.
    pub async fn drop(self) -> Result<(), VerifyError> {
        if self.memory.is_none() {
            self.coll.drop().await?;
        }
        Ok(())
    }
}

fn duplicates_only(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), mongodb::error::ErrorKind::InsertMany(im)
        if im.write_errors.as_ref().is_some_and(|w| w.iter().all(|w| w.code == 11000)))
}
