//! A document's version: the position in the source's history of the last event applied to it.
//!
//! Versions guard every write ficus makes (a write lands only over an older version), so they
//! must compare in commit order everywhere: in Rust, and inside MongoDB's `$lt`/`$gte`. A
//! fixed-width decimal string does both: 30 digits, the cluster time's seconds and increment
//! and the index among events sharing it, each padded to 10.

use std::fmt;

use bson::Timestamp;

/// A version, as stored in `_ficus.v`, tombstones and checkpoints of applied batches.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version(String);

impl Version {
    /// The version of a position in the source's history.
    pub fn at(cluster_time: Timestamp, index: u32) -> Version {
        Version(format!("{:010}{:010}{:010}", cluster_time.time, cluster_time.increment, index))
    }

    /// Parses the 30-digit form; `None` for anything else.
    pub fn parse(s: &str) -> Option<Version> {
        (s.len() == 30 && s.bytes().all(|b| b.is_ascii_digit())).then(|| Version(s.to_string()))
    }

    /// A version read back from the store, as it is (stored versions were all written by
    /// ficus; comparing them needs no parse).
    pub fn stored(s: &str) -> Version {
        Version(s.to_string())
    }

    /// The cluster time and index it names.
    pub fn position(&self) -> Option<(Timestamp, u32)> {
        let s = &self.0;
        if s.len() != 30 {
            return None;
        }
        let time = s[0..10].parse().ok()?;
        let increment = s[10..20].parse().ok()?;
        let index = s[20..30].parse().ok()?;
        Some((Timestamp { time, increment }, index))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a version read back from the store (`_ficus.v`, a tombstone, a ledger) is this
    /// one or newer: what every guard asks before a write. Versions are compared here only.
    pub fn held_by(&self, stored: &str) -> bool {
        stored >= self.0.as_str()
    }

    /// Whether a version read back from the store is strictly newer than this one.
    pub fn older_than(&self, stored: &str) -> bool {
        stored > self.0.as_str()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Version> for bson::Bson {
    fn from(v: Version) -> bson::Bson {
        bson::Bson::String(v.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_like_positions() {
        let a = Version::at(Timestamp { time: 9, increment: 99 }, 5);
        let b = Version::at(Timestamp { time: 10, increment: 1 }, 0);
        let c = Version::at(Timestamp { time: 10, increment: 1 }, 1);
        assert!(a < b && b < c);
        assert!(a.as_str() < b.as_str(), "the string order is the same, for MongoDB's comparisons");
        assert_eq!(c.position(), Some((Timestamp { time: 10, increment: 1 }, 1)));
        assert_eq!(Version::parse(c.as_str()), Some(c));
        assert_eq!(Version::parse("12"), None);
        assert_eq!(Version::parse("00000000x0000000000000000000001"), None);
    }

    #[test]
    fn a_stored_version_holds_this_one_when_it_is_the_same_or_newer() {
        let v = Version::at(Timestamp { time: 10, increment: 1 }, 1);
        let older = Version::at(Timestamp { time: 9, increment: 99 }, 5);
        let newer = Version::at(Timestamp { time: 10, increment: 2 }, 0);
        assert!(v.held_by(v.as_str()) && v.held_by(newer.as_str()) && !v.held_by(older.as_str()));
        assert!(v.older_than(newer.as_str()) && !v.older_than(v.as_str()) && !v.older_than(older.as_str()));
    }
}
