//! Who has seen which ownership: applications, which identify themselves when they read it
//! (`GET /cutover?instance=ID`, `ficus status --json --instance ID`) and are recorded with the
//! epoch they saw, and ficus's own processes, which acknowledge a record's revision once no
//! batch of theirs judged by an older one is still being written. Kept in ficus's store
//! (`<store.db>.views`, one document per instance: per service the number last seen, and when).
//!
//! A safe cutover's fence holds once every application seen within the longest allowed view age
//! (`cutover.view_max_age_secs`, the application contract) has seen the fence's epoch, or that
//! age has passed since the fence ([`fence_held`]); a forced switch takes effect once every
//! ficus process has acknowledged its pending step, or once no batch judged before it can still
//! commit ([`switch_held`]). Both decisions are pure, over what the registry holds.

use std::time::Duration;

use bson::{DateTime, Document, doc};
use futures::TryStreamExt;
use mongodb::{Collection, Database};

use super::ownership::OwnershipError;

/// The collection in the store.
pub const VIEWS: &str = "views";

/// Who read the ownership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Viewer {
    /// An application, by the instance id it gave.
    App,
    /// A ficus process (its consumers and tails).
    Ficus,
}

impl Viewer {
    fn as_str(self) -> &'static str {
        match self {
            Viewer::App => "app",
            Viewer::Ficus => "ficus",
        }
    }
}

/// One instance's last view of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub instance: String,
    /// The epoch it saw (applications) or acknowledged (ficus).
    pub epoch: i64,
    /// When it last read (applications) or acknowledged (ficus).
    pub at: DateTime,
}

/// What waiting for a fence or a switch comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// It holds: who acknowledged, and whether it ended by the age bound rather than by every
    /// instance acknowledging.
    Yes { acknowledged: Vec<String>, by_age: bool },
    /// Not yet: who is still to acknowledge.
    Waiting { missing: Vec<String> },
}

/// Whether a fence at `epoch`, set at `fenced_at`, holds at `now`: every application seen
/// within `max_age` before now has seen `epoch` or later, or `max_age` has passed since the
/// fence (no application acts on a view older than that).
pub fn fence_held(seen: &[Seen], epoch: i64, fenced_at: DateTime, now: DateTime, max_age: Duration) -> Held {
    let age = |t: DateTime| now.saturating_duration_since(t);
    let acknowledged: Vec<String> = seen.iter().filter(|s| s.epoch >= epoch).map(|s| s.instance.clone()).collect();
    if age(fenced_at) >= max_age {
        return Held::Yes { acknowledged, by_age: true };
    }
    // An instance whose last read is older than `max_age` no longer acts on any view it had.
    let missing: Vec<String> =
        seen.iter().filter(|s| s.epoch < epoch && age(s.at) < max_age).map(|s| s.instance.clone()).collect();
    if missing.is_empty() { Held::Yes { acknowledged, by_age: false } } else { Held::Waiting { missing } }
}

/// Whether a forced switch whose pending step is at revision `epoch` of the record, stored at
/// `pending_at`, may take effect at `now`: every ficus process that acknowledged anything within
/// `bound` before the pending step has acknowledged it, or `bound` has passed since (a
/// process that never acknowledges is gone or paused: any batch it judged before the step can
/// no longer commit by then, see `consume`'s judgement age and the servers' transaction
/// lifetime).
pub fn switch_held(seen: &[Seen], epoch: i64, pending_at: DateTime, now: DateTime, bound: Duration) -> Held {
    let acknowledged: Vec<String> = seen.iter().filter(|s| s.epoch >= epoch).map(|s| s.instance.clone()).collect();
    if now.saturating_duration_since(pending_at) >= bound {
        return Held::Yes { acknowledged, by_age: true };
    }
    let recent = |s: &&Seen| pending_at.saturating_duration_since(s.at) < bound;
    let missing: Vec<String> =
        seen.iter().filter(recent).filter(|s| s.epoch < epoch).map(|s| s.instance.clone()).collect();
    if missing.is_empty() { Held::Yes { acknowledged, by_age: false } } else { Held::Waiting { missing } }
}

/// The registry in the store.
#[derive(Clone)]
pub struct Views {
    coll: Collection<Document>,
}

impl Views {
    pub fn new(store: &Database) -> Views {
        Views { coll: store.collection(VIEWS) }
    }

    /// Records that `instance` saw (or acknowledged) these epochs, now; an epoch never moves
    /// back.
    pub async fn saw(&self, reader: Viewer, instance: &str, epochs: &[(String, i64)]) -> Result<(), OwnershipError> {
        if epochs.is_empty() {
            return Ok(());
        }
        let mut max = Document::new();
        for (service, epoch) in epochs {
            max.insert(format!("seen.{}", escape(service)), *epoch);
        }
        let set = doc! { "kind": reader.as_str(), "instance": instance, "at": DateTime::now() };
        let id = format!("{}/{instance}", reader.as_str());
        self.coll.update_one(doc! { "_id": id }, doc! { "$max": max, "$set": set }).upsert(true).await?;
        Ok(())
    }

    /// Every instance of a kind that read a service's ownership since `since`, with the epoch it
    /// last saw.
    pub async fn of(&self, reader: Viewer, service: &str, since: DateTime) -> Result<Vec<Seen>, OwnershipError> {
        let field = format!("seen.{}", escape(service));
        let found: Vec<Document> = self
            .coll
            .find(doc! { "kind": reader.as_str(), "at": { "$gte": since }, &field: { "$exists": true } })
            .await?
            .try_collect()
            .await?;
        Ok(found
            .into_iter()
            .filter_map(|d| {
                let epoch = d.get_document("seen").ok()?.get_i64(escape(service)).ok()?;
                Some(Seen { instance: d.get_str("instance").ok()?.to_string(), epoch, at: *d.get_datetime("at").ok()? })
            })
            .collect())
    }
}

/// A service name as a field name (service names are database names: no dots or `$`).
fn escape(service: &str) -> String {
    service.replace(['.', '$'], "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime {
        DateTime::from_millis(secs * 1000)
    }

    fn seen(instance: &str, epoch: i64, secs: i64) -> Seen {
        Seen { instance: instance.into(), epoch, at: at(secs) }
    }

    const AGE: Duration = Duration::from_secs(10);

    #[test]
    fn a_fence_holds_once_every_recent_reader_saw_it_or_the_view_age_passed() {
        // Fenced at epoch 7, at t = 100.
        let readers = [seen("a", 7, 101), seen("b", 6, 99), seen("old", 3, 80)];
        assert_eq!(
            fence_held(&readers, 7, at(100), at(102), AGE),
            Held::Waiting { missing: vec!["b".into()] },
            "b read 3 s ago, before the fence: it may still act on that view; `old` read 22 s ago: it cannot"
        );
        let readers = [seen("a", 7, 101), seen("b", 7, 103), seen("old", 3, 80)];
        assert_eq!(
            fence_held(&readers, 7, at(100), at(104), AGE),
            Held::Yes { acknowledged: vec!["a".into(), "b".into()], by_age: false }
        );
        // b never reads again: once its view is older than the age, it is no longer waited on…
        let readers = [seen("a", 7, 101), seen("b", 6, 99)];
        assert_eq!(
            fence_held(&readers, 7, at(100), at(109), AGE),
            Held::Yes { acknowledged: vec!["a".into()], by_age: false }
        );
        // …and nobody at all is waited on past the age since the fence.
        assert_eq!(
            fence_held(&readers, 7, at(100), at(110), AGE),
            Held::Yes { acknowledged: vec!["a".into()], by_age: true }
        );
        assert_eq!(fence_held(&[], 7, at(100), at(100), AGE), Held::Yes { acknowledged: vec![], by_age: false });
    }

    #[test]
    fn a_forced_switch_waits_for_every_recent_process_or_the_bound() {
        let bound = Duration::from_secs(95);
        let procs = [seen("p1", 12, 101), seen("p2", 11, 99), seen("dead", 4, 1)];
        assert_eq!(switch_held(&procs, 12, at(100), at(101), bound), Held::Waiting { missing: vec!["p2".into()] });
        let procs = [seen("p1", 12, 101), seen("p2", 12, 102), seen("dead", 4, 1)];
        assert_eq!(
            switch_held(&procs, 12, at(100), at(102), bound),
            Held::Yes { acknowledged: vec!["p1".into(), "p2".into()], by_age: false },
            "a process last heard of long before the step is not waited on"
        );
        let paused = [seen("p1", 12, 101), seen("p2", 11, 99)];
        assert!(matches!(switch_held(&paused, 12, at(100), at(195), bound), Held::Yes { by_age: true, .. }));
    }
}
