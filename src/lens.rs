//! `ficus lens check`: the lens laws of every service's derived reverse, proved on the monolith's
//! own documents.
//!
//! Reverse sync writes service changes back into the monolith through reverses derived from the
//! transforms. Fixtures and property tests show the derivation is right on the shapes someone
//! thought of; the monolith's real documents hold the shapes nobody thought of (legacy types,
//! odd keys, arrays with repeated ids). This is the thin edge that reads them: every document
//! (or `--sample N` per collection, in `_id` order) of each monolith collection a service's
//! reversible targets come from, raw and converted structurally as `verify` reads them, handed
//! to the pure check in [`crate::transform::LensCheck`], which judges and renders.

use std::sync::Arc;

use bson::{RawDocumentBuf, doc};
use futures::TryStreamExt;

use crate::config::topics::Topics;
use crate::mongo;
use crate::transform::{LensCheck, ServiceTransforms};

/// How many failures are shown side by side per service (all are counted).
pub const FAILURES_SHOWN: usize = 10;

/// Why a lens check could not run.
#[derive(Debug, thiserror::Error)]
pub enum LensError {
    /// `--service` names no service (bad input: exit 2).
    #[error("{0}")]
    UnknownService(String),
    #[error("MongoDB: {}", mongo::describe(.0))]
    Mongo(#[from] mongodb::error::Error),
    #[error("a document of {collection} is not valid BSON: {error}")]
    Bson { collection: String, error: bson::error::Error },
}

/// Checks the chosen services (all, or the one named) against the monolith database `db`,
/// printing each report as it completes. `Ok(true)` when every law held.
pub async fn check(
    services: &[Arc<ServiceTransforms>],
    topics: &Topics,
    source: &mongodb::Database,
    source_name: &str,
    service: Option<&str>,
    sample: Option<u64>,
) -> Result<bool, LensError> {
    let chosen: Vec<&ServiceTransforms> = match service {
        None => services.iter().map(AsRef::as_ref).collect(),
        Some(name) => match services.iter().find(|s| s.service() == name) {
            Some(s) => vec![s.as_ref()],
            None => {
                let known: Vec<&str> = services.iter().map(|s| s.service()).collect();
                return Err(LensError::UnknownService(format!(
                    "no service `{name}` in transforms/ (known: {})",
                    known.join(", ")
                )));
            }
        },
    };
    let mut ok = true;
    for svc in chosen {
        let mut check = LensCheck::new(svc, topics, source_name);
        for collection in check.source_collections() {
            let coll = source.collection::<RawDocumentBuf>(&collection);
            // A limit of 0 means none to MongoDB.
            let limit = sample.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX));
            if sample == Some(0) {
                continue;
            }
            let mut cursor = coll.find(doc! {}).sort(doc! { "_id": 1 }).limit(limit).batch_size(1000).await?;
            while let Some(raw) = cursor.try_next().await? {
                let doc = mongo::to_document(&raw)
                    .map_err(|error| LensError::Bson { collection: collection.clone(), error })?;
                check.document(&collection, &doc);
            }
        }
        let report = check.finish();
        ok &= report.ok();
        println!("{}", report.render(FAILURES_SHOWN));
    }
    Ok(ok)
}
