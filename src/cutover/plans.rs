//! Progressive rollouts in ficus's store: the plan under way per service (`<store.db>.rollouts`:
//! its shares, the ones whose hold finished, the hold under way and the counts its step started
//! from), so the same command goes on after a `kill -9` and `GET /cutover` shows where it
//! stands; and the counts the last `ficus analyze --once` started from
//! (`<store.db>.analysis_baselines`), so each run counts what is new since the one before.

use bson::{DateTime, doc};
use futures::TryStreamExt;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

use super::log::CheckReading;
use super::ownership::OwnershipError;

/// The plans under way, one per service.
pub const ROLLOUTS: &str = "rollouts";
/// The counts the last one-shot analysis started from, one per service.
pub const BASELINES: &str = "analysis_baselines";

/// What a step's counts start from: the ends of the service's conflicts topic and the total
/// of its dead-letter topics when it began.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Per partition of `<service>.conflicts`: its end.
    pub conflicts: Vec<(i32, i64)>,
    pub dead_letters: i64,
    pub at: DateTime,
}

/// A hold under way.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Holding {
    pub at: u8,
    pub since: DateTime,
}

/// A plan under way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRecord {
    #[serde(rename = "_id")]
    pub service: String,
    pub from: u8,
    pub shares: Vec<u8>,
    /// The shares whose hold finished, in plan order.
    #[serde(default)]
    pub held: Vec<u8>,
    /// How long each hold lasts, in seconds.
    #[serde(default)]
    pub hold_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holding: Option<Holding>,
    /// What the step under way counts from (taken before its move).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Baseline>,
    /// The last measurement: when, and each check's reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Measured>,
}

/// A plan's last measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub at: DateTime,
    pub readings: Vec<CheckReading>,
}

impl PlanRecord {
    /// Seconds left of the hold under way (0 once its time is up; `None` without one).
    pub fn hold_left_secs(&self, now: DateTime) -> Option<u64> {
        let h = self.holding?;
        Some(self.hold_secs.saturating_sub(now.saturating_duration_since(h.since).as_secs()))
    }
}

/// The plans and baselines in the store.
#[derive(Clone)]
pub struct PlanStore {
    plans: Collection<PlanRecord>,
    baselines: Collection<bson::Document>,
}

impl PlanStore {
    pub fn new(store: &Database) -> PlanStore {
        PlanStore { plans: store.collection(ROLLOUTS), baselines: store.collection(BASELINES) }
    }

    pub async fn get(&self, service: &str) -> Result<Option<PlanRecord>, OwnershipError> {
        self.plans.find_one(doc! { "_id": service }).await.map_err(|e| corrupt_or(e, service))
    }

    pub async fn all(&self) -> Result<Vec<PlanRecord>, OwnershipError> {
        let found = self.plans.find(doc! {}).await?;
        found.try_collect().await.map_err(|e| corrupt_or(e, "a plan"))
    }

    pub async fn start(&self, plan: &PlanRecord) -> Result<(), OwnershipError> {
        self.plans.insert_one(plan).await?;
        Ok(())
    }

    /// A hold begins (or resumes: its start stands).
    pub async fn holding(&self, service: &str, at: u8) -> Result<(), OwnershipError> {
        let since = DateTime::now();
        let unless_same = doc! { "_id": service, "holding.at": { "$ne": i32::from(at) } };
        self.plans
            .update_one(unless_same, doc! { "$set": { "holding": { "at": i32::from(at), "since": since } } })
            .await?;
        Ok(())
    }

    /// A hold passed: its share is recorded as held, the step's counts and hold are done.
    pub async fn held(&self, service: &str, at: u8) -> Result<(), OwnershipError> {
        let update = doc! { "$push": { "held": i32::from(at) }, "$unset": { "holding": "", "baseline": "" } };
        self.plans.update_one(doc! { "_id": service }, update).await?;
        Ok(())
    }

    /// The counts a step starts from.
    pub async fn step_baseline(&self, service: &str, b: &Baseline) -> Result<(), OwnershipError> {
        let b = bson::serialize_to_bson(b).map_err(|e| corrupt(service, e))?;
        self.plans.update_one(doc! { "_id": service }, doc! { "$set": { "baseline": b } }).await?;
        Ok(())
    }

    /// A measurement of the hold under way.
    pub async fn measured(&self, service: &str, m: &Measured) -> Result<(), OwnershipError> {
        let m = bson::serialize_to_bson(m).map_err(|e| corrupt(service, e))?;
        self.plans.update_one(doc! { "_id": service }, doc! { "$set": { "last": m } }).await?;
        Ok(())
    }

    pub async fn forget(&self, service: &str) -> Result<(), OwnershipError> {
        self.plans.delete_one(doc! { "_id": service }).await?;
        Ok(())
    }

    /// The counts the last one-shot analysis of `service` started from.
    pub async fn last_baseline(&self, service: &str) -> Result<Option<Baseline>, OwnershipError> {
        let Some(d) = self.baselines.find_one(doc! { "_id": service }).await? else { return Ok(None) };
        let b = d.get_document("baseline").map_err(|e| corrupt(service, e))?;
        bson::deserialize_from_document(b.clone()).map(Some).map_err(|e| corrupt(service, e))
    }

    pub async fn save_baseline(&self, service: &str, b: &Baseline) -> Result<(), OwnershipError> {
        let b = bson::serialize_to_bson(b).map_err(|e| corrupt(service, e))?;
        self.baselines
            .replace_one(doc! { "_id": service }, doc! { "_id": service, "baseline": b })
            .upsert(true)
            .await?;
        Ok(())
    }
}

fn corrupt(service: &str, e: impl std::fmt::Display) -> OwnershipError {
    OwnershipError::Corrupt { service: format!("{service} (rollout)"), reason: e.to_string() }
}

/// A read that failed to decode is a corrupt record, anything else the server's error.
fn corrupt_or(e: mongodb::error::Error, service: &str) -> OwnershipError {
    match *e.kind {
        mongodb::error::ErrorKind::BsonDeserialization(_) => corrupt(service, e),
        _ => OwnershipError::from(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_of_an_earlier_version_reads_and_the_hold_counts_down() {
        // As the first version of `ficus cutover --plan` wrote it.
        let old = doc! { "_id": "customers_db", "from": 0, "shares": [10, 50], "held": [10] };
        let r: PlanRecord = bson::deserialize_from_document(old).unwrap();
        assert_eq!((r.from, r.shares.as_slice(), r.held.as_slice(), r.holding), (0, &[10, 50][..], &[10][..], None));
        let since = DateTime::from_millis(1_000_000);
        let holding = PlanRecord { hold_secs: 300, holding: Some(Holding { at: 50, since }), ..r };
        assert_eq!(holding.hold_left_secs(DateTime::from_millis(1_000_000 + 120_500)), Some(180));
        assert_eq!(holding.hold_left_secs(DateTime::from_millis(1_000_000 + 900_000)), Some(0));
        let d = bson::serialize_to_document(&holding).unwrap();
        assert_eq!(d.get_document("holding").unwrap().get_i32("at").unwrap(), 50, "{d}");
        assert!(d.get("baseline").is_none(), "absent, not null: {d}");
    }
}
