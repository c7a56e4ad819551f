//! The migration log (`<store.db>.migration_log`): what happened to each service's ownership,
//! in order, for the people who answer for the migration. Every move, each of its steps (how
//! long it took, what it found), every gate that failed, every abort, forced switch and
//! emergency move, every plan with its holds, analysis verdicts and rollbacks is one entry,
//! written by the command that did it. `ficus log` reads it; the records of `cutover::moves`
//! and the plans stay the source of truth for resuming, this is the account of what was done.
//!
//! The log is append-only and never read to decide anything, so a failure to append is reported
//! to the operator and the command goes on (an emergency rollback must not wait for its log).

use bson::{DateTime, doc};
use futures::TryStreamExt;
use mongodb::{Collection, Database};
use serde::{Deserialize, Serialize};

/// The collection in the store.
pub const MIGRATION_LOG: &str = "migration_log";

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A safe move began (or an emergency move: fenced and drained, neither lens-checked nor verified).
    MoveStarted,
    /// A step of a move finished.
    Step,
    /// A move's gate failed: nothing flipped.
    GateFailed,
    /// A move finished: the share is the service's.
    MoveDone,
    /// A move was aborted (or a plan walked back).
    Aborted,
    /// `--force`: a share set at once.
    Forced,
    /// A plan began (or resumed).
    PlanStarted,
    /// One analysis of a plan's hold: each check's reading against its bounds.
    Analysis,
    /// A plan's hold at a share passed.
    Held,
    /// A critical check failed: the plan rolled back.
    RolledBack,
    /// A check failed past its limit: the plan stopped where it was.
    Stopped,
    /// Every share of a plan moved to and held.
    PlanDone,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::MoveStarted => "move-started",
            Kind::Step => "step",
            Kind::GateFailed => "gate-failed",
            Kind::MoveDone => "move-done",
            Kind::Aborted => "aborted",
            Kind::Forced => "forced",
            Kind::PlanStarted => "plan-started",
            Kind::Analysis => "analysis",
            Kind::Held => "held",
            Kind::RolledBack => "rolled-back",
            Kind::Stopped => "stopped",
            Kind::PlanDone => "plan-done",
        }
    }
}

/// One check's reading in an analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckReading {
    pub metric: String,
    /// `None`: no data, or the reading failed (`result` says which).
    pub value: Option<f64>,
    pub bounds: String,
    /// `pass`, `fail`, `inconclusive` (no data) or `error`.
    pub result: String,
}

/// One entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub at: DateTime,
    pub service: String,
    pub kind: Kind,
    /// The share the service owned when it happened, and the share it was going to.
    pub from: u8,
    pub to: u8,
    /// The step, for a step or a failed gate (`fence`, `drain`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// How long it took, for what takes time (a step, a move, a rollback), in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_secs: Option<f64>,
    /// What it found or why it happened.
    #[serde(default)]
    pub detail: String,
    /// For an analysis: each check's reading, bounds and result.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readings: Vec<CheckReading>,
    /// The command that wrote it: host and process.
    pub by: String,
}

impl Entry {
    /// An entry made now by this process.
    pub fn now(service: &str, kind: Kind, from: u8, to: u8, detail: impl Into<String>) -> Entry {
        Entry {
            at: DateTime::now(),
            service: service.to_string(),
            kind,
            from,
            to,
            step: None,
            took_secs: None,
            detail: detail.into(),
            readings: Vec::new(),
            by: format!("{}:{}", crate::config::host_name(), std::process::id()),
        }
    }

    pub fn step(mut self, step: &str) -> Entry {
        self.step = Some(step.to_string());
        self
    }

    pub fn took(mut self, took: std::time::Duration) -> Entry {
        self.took_secs = Some(took.as_secs_f64());
        self
    }

    /// The entry as `ficus log` prints it: time, service, what, shares, step, duration, detail.
    pub fn line(&self) -> String {
        let at = humantime::format_rfc3339_millis(self.at.to_system_time());
        let shares =
            if self.from == self.to { format!("at {}%", self.to) } else { format!("{}%→{}%", self.from, self.to) };
        let mut out = format!("{at}  {:<14} {:<12} {shares}", self.service, self.kind.as_str());
        if let Some(step) = &self.step {
            out.push_str(&format!("  {step}"));
        }
        if let Some(t) = self.took_secs {
            out.push_str(&format!(" ({t:.1}s)"));
        }
        if !self.detail.is_empty() {
            out.push_str(&format!(": {}", self.detail));
        }
        out
    }
}

impl Entry {
    /// The entry for scripts and `GET /log`: times in RFC 3339, absent fields left out.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "at": humantime::format_rfc3339_millis(self.at.to_system_time()).to_string(),
            "service": self.service,
            "kind": self.kind.as_str(),
            "from": self.from,
            "to": self.to,
            "detail": self.detail,
            "by": self.by,
        });
        if let Some(step) = &self.step {
            v["step"] = step.as_str().into();
        }
        if let Some(t) = self.took_secs {
            v["tookSecs"] = t.into();
        }
        if !self.readings.is_empty() {
            v["readings"] = self
                .readings
                .iter()
                .map(|r| serde_json::json!({ "metric": r.metric, "value": r.value, "bounds": r.bounds, "result": r.result }))
                .collect();
        }
        v
    }
}

/// The log in the store.
#[derive(Clone)]
pub struct MigrationLog {
    coll: Collection<Entry>,
}

impl MigrationLog {
    pub fn new(store: &Database) -> MigrationLog {
        MigrationLog { coll: store.collection(MIGRATION_LOG) }
    }

    pub async fn append(&self, entry: &Entry) -> Result<(), mongodb::error::Error> {
        self.coll.insert_one(entry).await.map(|_| ())
    }

    /// The entries, oldest first: of one service or all, the last `limit` of them.
    pub async fn read(&self, service: Option<&str>, limit: i64) -> Result<Vec<Entry>, mongodb::error::Error> {
        let filter = service.map_or_else(|| doc! {}, |s| doc! { "service": s });
        // Newest first to take the last `limit`, then in the order they happened.
        let mut entries: Vec<Entry> =
            self.coll.find(filter).sort(doc! { "at": -1, "_id": -1 }).limit(limit).await?.try_collect().await?;
        entries.reverse();
        Ok(entries)
    }

    /// The entries written after `after`, oldest first (at most 1,000: the rest next time).
    pub async fn since(&self, after: DateTime) -> Result<Vec<Entry>, mongodb::error::Error> {
        self.coll
            .find(doc! { "at": { "$gt": after } })
            .sort(doc! { "at": 1, "_id": 1 })
            .limit(1000)
            .await?
            .try_collect()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: Kind, from: u8, to: u8) -> Entry {
        Entry {
            at: DateTime::from_millis(1_796_000_000_000),
            service: "customers_db".into(),
            kind,
            from,
            to,
            step: None,
            took_secs: None,
            detail: String::new(),
            readings: Vec::new(),
            by: "h:1".into(),
        }
    }

    #[test]
    fn a_step_prints_its_shares_name_duration_and_finding() {
        let e = Entry {
            step: Some("drain".into()),
            took_secs: Some(2.345),
            detail: "3 partitions".into(),
            ..entry(Kind::Step, 0, 10)
        };
        assert_eq!(
            e.line(),
            "2026-11-30T00:53:20.000Z  customers_db   step         0%→10%  drain (2.3s): 3 partitions"
        );
    }

    #[test]
    fn an_entry_at_one_share_says_at() {
        let e = Entry { detail: "forward_lag 0 (≤ 1000, pass)".into(), ..entry(Kind::Analysis, 10, 10) };
        assert_eq!(
            e.line(),
            "2026-11-30T00:53:20.000Z  customers_db   analysis     at 10%: forward_lag 0 (≤ 1000, pass)"
        );
    }

    #[test]
    fn entries_round_trip_through_bson_with_kebab_kinds() {
        let e = Entry { step: Some("flip".into()), ..entry(Kind::GateFailed, 50, 10) };
        let d = bson::serialize_to_document(&e).unwrap();
        assert_eq!(d.get_str("kind").unwrap(), "gate-failed");
        assert!(d.get("took_secs").is_none(), "absent fields are left out: {d}");
        assert_eq!(bson::deserialize_from_document::<Entry>(d).unwrap(), e);
    }
}
